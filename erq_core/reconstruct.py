"""Block-wise output reconstruction, starting from the erq+ solution (optional, `--reconstruct`).

For each block in turn, with its input from the quantized model and its target from the FP model,
gradient descent lowers || block_q(x~) - block_fp(x) ||^2 by learning
- the rounding of every weight: W = W0 + s * U with U learned in units of the quantization step,
  rounded with a straight-through estimator, so a weight can move to another grid point
  (AdaRound's idea, with erq+'s weights as the start instead of round-to-nearest);
- the scale of every activation quantizer of the block (LSQ-style gradient through the
  straight-through rounding), zero points fixed;
- the biases, which stay in full precision.
As in QDrop, each quantized activation is replaced by its FP value with probability 1/2 during
training, which keeps the learned weights from overfitting the few calibration images.

When a block is done its weights are put back exactly on the (unchanged) weight grid, so the
checkpoint format does not change.

`progress(done, total)` is called after every step: a block's reconstruction is long (minutes on a
CPU), and the caller's progress callback is where a job is stopped (cancel, shutdown, time limit).
"""
from __future__ import annotations

import math
import types
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from erq_core.qmodules import QuantLinear, QuantMatMul
from erq_core.quantizers import LogSqrt2Quantizer, UniformQuantizer, log_steps

DROP_PROBABILITY = 0.5
WEIGHT_LR = 1e-2  # in units of quantization steps
SCALE_LR = 1e-3  # on log(scale)
BIAS_LR = 1e-4


def _round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def _uniform_ste(x: Tensor, log_scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    scale = log_scale.exp()
    codes = torch.clamp(_round_ste(x / scale) + zero_point, 0, 2**bits - 1)
    return (codes - zero_point) * scale


def _log_sqrt2_ste(x: Tensor, log_scale: Tensor, bits: int) -> Tensor:
    levels, steps = 2**bits, log_steps(bits)
    codes = _round_ste(-steps * (torch.log2(x.clamp(min=1e-30)) - log_scale / math.log(2)))
    underflow = (codes >= levels).detach()
    codes = codes.clamp(0, levels - 1)
    return torch.where(underflow, torch.zeros_like(x), torch.exp2(codes / -steps) * log_scale.exp())


class _LearnedActivation:
    def __init__(self, quantizer: nn.Module):
        self.quantizer = quantizer
        self.log_scale = nn.Parameter(quantizer.scale.detach().float().clamp(min=1e-8).log().clone())

    def forward(self, x: Tensor, training: bool) -> Tensor:
        q = self.quantizer
        if isinstance(q, LogSqrt2Quantizer):
            x_hat = _log_sqrt2_ste(x, self.log_scale, q.bits)
        else:
            x_hat = _uniform_ste(x, self.log_scale, q.zero_point, q.bits)
        if training:
            keep = torch.rand_like(x) < DROP_PROBABILITY
            return torch.where(keep, x, x_hat)
        return x_hat

    def commit(self) -> None:
        self.quantizer.scale = self.log_scale.detach().exp().to(self.quantizer.scale)


class _LearnedWeight:
    def __init__(self, layer: QuantLinear):
        self.layer = layer
        quantizer = layer.weight_quantizer
        self.scale, self.zero = (t.to(layer.weight.dtype) for t in quantizer.column_scale())
        self.start = layer.weight.detach().clone()
        self.offset = nn.Parameter(torch.zeros_like(self.start))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.bits = quantizer.bits

    def weight(self) -> Tensor:
        continuous = self.start + self.scale * self.offset
        codes = torch.clamp(_round_ste(continuous / self.scale) + self.zero, 0, 2**self.bits - 1)
        return (codes - self.zero) * self.scale

    def commit(self) -> None:
        with torch.no_grad():
            self.layer.weight.copy_(self.weight())
            if self.bias is not None:
                self.layer.bias.copy_(self.bias)


@contextmanager
def _trainable(block: nn.Module) -> Iterator[tuple[list[_LearnedWeight], list[_LearnedActivation], list]]:
    """Give the block's quantized modules a differentiable forward while inside the context."""
    weights = [_LearnedWeight(m) for m in block.modules() if isinstance(m, QuantLinear)]
    activations: dict[nn.Module, _LearnedActivation] = {
        q: _LearnedActivation(q) for q in block.modules() if isinstance(q, (UniformQuantizer, LogSqrt2Quantizer))
        and not (isinstance(q, UniformQuantizer) and q.per_channel)}
    state = {"training": True}
    saved = []
    for learned in weights:
        layer = learned.layer

        def linear_forward(self, x, learned=learned):
            x = activations[self.input_quantizer].forward(x, state["training"])
            return torch.nn.functional.linear(x, learned.weight(), learned.bias)

        saved.append((layer, layer.forward))
        layer.forward = types.MethodType(linear_forward, layer)
    for matmul in [m for m in block.modules() if isinstance(m, QuantMatMul)]:
        def matmul_forward(self, a, b):
            return (activations[self.a_quantizer].forward(a, state["training"])
                    @ activations[self.b_quantizer].forward(b, state["training"]))

        saved.append((matmul, matmul.forward))
        matmul.forward = types.MethodType(matmul_forward, matmul)
    try:
        yield weights, list(activations.values()), [state]
    finally:
        for module, forward in saved:
            module.forward = forward


def reconstruct_block(block: nn.Module, q_inputs: list[Tensor], targets: list[Tensor], iterations: int,
                      batch_size: int = 32, seed: int = 0,
                      progress: Optional[Callable[[int, int], None]] = None) -> tuple[float, float]:
    """Learn the block's rounding, activation scales and biases; returns the loss before and after.
    An exception raised by `progress` stops it with the block's modules restored."""
    x_all = torch.cat(q_inputs)
    y_all = torch.cat(targets)
    generator = torch.Generator().manual_seed(seed)
    with _trainable(block) as (weights, activations, (state,)):
        groups = [{"params": [w.offset for w in weights], "lr": WEIGHT_LR},
                  {"params": [a.log_scale for a in activations], "lr": SCALE_LR},
                  {"params": [w.bias for w in weights if w.bias is not None], "lr": BIAS_LR}]
        optimizer = torch.optim.Adam([g for g in groups if g["params"]])

        def loss_on(indices: Optional[Tensor], training: bool) -> Tensor:
            state["training"] = training
            x = x_all if indices is None else x_all[indices]
            y = y_all if indices is None else y_all[indices]
            return (block(x) - y).pow(2).mean()

        with torch.no_grad():
            before = float(loss_on(None, False))
        with torch.enable_grad():
            for step in range(iterations):
                indices = torch.randint(0, x_all.shape[0], (min(batch_size, x_all.shape[0]),), generator=generator)
                optimizer.zero_grad()
                loss = loss_on(indices, True)
                loss.backward()
                optimizer.step()
                if progress is not None:
                    progress(step + 1, iterations)
        with torch.no_grad():
            after = float(loss_on(None, False))
            if after > before:  # learning made it worse (too few images, too many steps): keep the start
                return before, before
            for learned in weights:
                learned.commit()
            for learned in activations:
                learned.commit()
    for m in block.modules():
        if isinstance(m, QuantLinear):
            m._cache = None
    return before, after
