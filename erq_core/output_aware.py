"""Output-aware activation ranges: each activation quantizer's range is the candidate that
least disturbs what its consumer computes, not the one with the least error on the activation.

- the input of a linear layer: || (Q(X) - X) W^T ||^2, W the layer's weight;
- an operand of an attention matmul a @ b: || (Q(a) - a) b ||^2, or || a (Q(b) - b) ||^2.

Candidates are finer than the MSE search (more percentiles, lower and upper searched in turn
for uniform quantizers; for the log-sqrt2 quantizer, percentiles and steps of 2^(1/4) around
the current scale). The error is measured on the inputs the quantizer really sees in the
partly quantized model, on a sample of rows to bound the cost.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from erq_core.quantizers import (LogSqrt2Quantizer, TokenQuantizer, UniformQuantizer, fake_quantize,
                                 log_sqrt2_quantize, percentile_bounds, range_to_scale, token_quantize)

FINE_PERCENTILES = (0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99995, 0.99999, 1.0)
LOG_SCALE_STEPS = tuple(2 ** (k / 4) for k in range(-4, 5))
MAX_ROWS = 1024

Loss = Callable[[Tensor], Tensor]


def sample_rows(x: Tensor, max_rows: int = MAX_ROWS) -> Tensor:
    """At most max_rows rows of a (rows, features) matrix, evenly spaced."""
    step = max(1, -(-x.shape[0] // max_rows))
    return x[::step]


def linear_input_loss(x: Tensor, weight: Tensor) -> Loss:
    rows = sample_rows(x.reshape(-1, x.shape[-1]).float())
    w = weight.float()
    return lambda quantize: ((quantize(rows) - rows) @ w.T).pow(2).sum()


def matmul_loss(a: Tensor, b: Tensor, operand: int) -> Loss:
    a, b = a.float(), b.float()
    if operand == 0:
        return lambda quantize: ((quantize(a) - a) @ b).pow(2).sum()
    return lambda quantize: (a @ (quantize(b) - b)).pow(2).sum()


@torch.no_grad()
def search_uniform(quantizer: UniformQuantizer, x: Tensor, loss: Loss) -> None:
    """Per-tensor range with least `loss`: the upper end over fine percentiles with the lower end
    fixed, then the lower end with the upper fixed (starting from the quantizer's own range)."""
    if quantizer.per_channel:
        raise ValueError("output-aware search is for per-tensor quantizers")
    flat = x.detach().float().reshape(-1, 1)
    uppers, lowers = percentile_bounds(flat, FINE_PERCENTILES, dim=0)
    uppers, lowers = uppers.reshape(-1), lowers.reshape(-1)
    top = 2**quantizer.bits - 1
    scale, zero = quantizer.scale.float(), quantizer.zero_point.float()
    best_lower, best_upper = -zero * scale, (top - zero) * scale

    def evaluate(lower: Tensor, upper: Tensor) -> float:
        s, z = range_to_scale(upper.reshape(1), lower.reshape(1), quantizer.bits)
        return float(loss(lambda t: fake_quantize(t, s, z, quantizer.bits)))

    best = evaluate(best_lower, best_upper)
    for candidate in uppers:
        if candidate > best_lower and (err := evaluate(best_lower, candidate)) < best:
            best, best_upper = err, candidate
    for candidate in lowers:
        if candidate < best_upper and (err := evaluate(candidate, best_upper)) < best:
            best, best_lower = err, candidate
    s, z = range_to_scale(best_upper.reshape(1), best_lower.reshape(1), quantizer.bits)
    quantizer.scale = s.to(quantizer.scale)
    quantizer.zero_point = z.to(quantizer.zero_point)


@torch.no_grad()
def search_log_sqrt2(quantizer: LogSqrt2Quantizer, x: Tensor, loss: Loss) -> None:
    """Scale with least `loss` among fine percentiles and 2^(k/4) multiples of the current one."""
    flat = x.detach().float().reshape(-1, 1)
    candidates = percentile_bounds(flat, FINE_PERCENTILES, dim=0)[0].reshape(-1).tolist()
    current = float(quantizer.scale)
    candidates += [current * step for step in LOG_SCALE_STEPS]
    best, best_scale = None, current
    for candidate in candidates:
        if candidate <= 0:
            continue
        s = torch.tensor(candidate, dtype=torch.float32, device=x.device)
        err = float(loss(lambda t: log_sqrt2_quantize(t, s, quantizer.bits)))
        if best is None or err < best:
            best, best_scale = err, candidate
    quantizer.scale = torch.tensor([best_scale]).to(quantizer.scale)


@torch.no_grad()
def search_token_clip(quantizer: TokenQuantizer, loss: Loss) -> None:
    """The clipping ratio of a dynamic per-token quantizer with least `loss` (its ranges are each
    token's own at run time: only the ratio applied to them is searched)."""
    quantizer.choose_clip(lambda clip: float(loss(lambda t: token_quantize(t, quantizer.bits, clip, quantizer.dim))))


def search_range(quantizer: nn.Module, x: Tensor, loss: Loss) -> None:
    if isinstance(quantizer, LogSqrt2Quantizer):
        search_log_sqrt2(quantizer, x, loss)
    elif isinstance(quantizer, TokenQuantizer):
        search_token_clip(quantizer, loss)
    else:
        search_uniform(quantizer, x, loss)
