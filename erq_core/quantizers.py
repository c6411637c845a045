"""The three quantizers of the RepQ-ViT base: uniform activations, log-sqrt2 post-softmax, and
per-output-channel weights (optionally two-part, with their own scales for outlier columns).

Asymmetric uniform: q = clamp(round(x / s) + z, 0, 2^b - 1), x_hat = (q - z) * s.
Clipping ranges are searched over a few percentiles, keeping the least squared error.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

WEIGHT_PERCENTILES = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999, 1.0)
ACTIVATION_PERCENTILES = (0.999, 0.9999, 0.99999)
# Output-aware weight clipping also tries each row's min and max shrunk by these factors.
CLIP_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
_MIN_SCALE = 1e-8


def _extreme_values(x: Tensor, k: int, largest: bool) -> Tensor:
    """x.topk(k, dim=-1, sorted=True) for a 1-D x, fast on millions of entries.

    A strided sample gives a threshold that about 4k entries pass; the exact top-k is then taken
    among those few. When the sample misjudges (fewer than k pass), it falls back to a full top-k.
    """
    n = x.shape[-1]
    if x.dim() == 1 and n > 64 * k and n > 1_000_000:
        sample = x[:: max(1, n // 200_000)]
        rank = min(sample.numel() - 1, max(0, round(4 * k * sample.numel() / n)))
        threshold = sample.topk(rank + 1, largest=largest).values[-1]
        kept = x[x >= threshold] if largest else x[x <= threshold]
        if kept.numel() >= k:
            return kept.topk(k, largest=largest, sorted=True).values
    return x.topk(k, dim=-1, largest=largest, sorted=True).values


def percentile_bounds(x: Tensor, percentiles: Sequence[float], dim: int) -> tuple[Tensor, Tensor]:
    """Upper (p) and lower (1 - p) percentiles of x along `dim`, one row per p.

    Linearly interpolated between order statistics, as torch.quantile (and the papers' code)
    computes them, but read off one top-k of each end instead of a sort: activations have
    millions of entries, and torch.quantile refuses inputs above 16M elements.
    Returns two tensors of shape (len(percentiles), *x.shape without dim).
    """
    x = x.movedim(dim, -1)
    if x.dim() == 2 and x.shape[0] == 1:
        x = x.reshape(-1)
    n = x.shape[-1]
    upper_pos = [p * (n - 1) for p in percentiles]  # fractional positions in the ascending order
    lower_pos = [(1 - p) * (n - 1) for p in percentiles]
    k = min(n, max(max(n - 1 - math.floor(u) for u in upper_pos), max(math.ceil(v) for v in lower_pos)) + 1)
    top = _extreme_values(x, k, largest=True)  # top[..., j] is the (j+1)-th largest
    bottom = _extreme_values(x, k, largest=False)  # bottom[..., j] is the (j+1)-th smallest

    def interpolate(values: Tensor, below: int, above: int, fraction: float) -> Tensor:
        return values[..., below] + fraction * (values[..., above] - values[..., below])

    uppers = torch.stack([interpolate(top, n - 1 - math.floor(u), n - 1 - min(math.floor(u) + 1, n - 1),
                                      u - math.floor(u)) for u in upper_pos])
    lowers = torch.stack([interpolate(bottom, math.floor(v), min(math.floor(v) + 1, n - 1), v - math.floor(v))
                          for v in lower_pos])
    if uppers.dim() == 1:
        uppers, lowers = uppers[:, None], lowers[:, None]
    return uppers, lowers


def range_to_scale(upper: Tensor, lower: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale and (integer) zero point that map [lower, upper] onto the codes 0..2^b-1."""
    scale = ((upper - lower) / (2**bits - 1)).clamp(min=_MIN_SCALE)
    zero_point = torch.round(-lower / scale)
    return scale, zero_point


def integer_in(value: float, top: int) -> bool:
    return value.is_integer() and 0 <= value <= top


def _per_tensor_integer(x: Tensor, scale: Tensor, zero_point: Tensor, top: int) -> bool:
    """Whether torch's fused per-tensor kernel applies: float32, one scale, an integer zero point in
    range (a fractional one would be truncated by it, so it goes the long way instead)."""
    return scale.numel() == 1 and x.dtype == torch.float32 and integer_in(float(zero_point), top)


def _autograd_watches(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _in_place_keeps_dtype_and_shape(codes: Tensor, *operands: Tensor) -> bool:
    """Whether codes op= operand computes what codes op operand would (same result dtype and shape),
    and autograd is not watching (it cannot differentiate through buffers written in place)."""
    if _autograd_watches(codes, *operands):
        return False
    return (all(torch.result_type(codes, t) == codes.dtype for t in operands)
            and torch.broadcast_shapes(codes.shape, *(t.shape for t in operands)) == codes.shape)


_CHUNK = 1 << 16  # elements per chunk: the few passes over a chunk stay in the core's cache


def _chunks(x: Tensor, out: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """Matching slices of x and out, cache-sized when both are contiguous; else the whole tensors."""
    if not (x.is_contiguous() and out.is_contiguous()) or x.shape != out.shape:
        yield x, out
        return
    flat_x, flat_out = x.reshape(-1), out.reshape(-1)
    for start in range(0, flat_x.numel(), _CHUNK):
        yield flat_x[start:start + _CHUNK], flat_out[start:start + _CHUNK]


def _fused_kernel_into(x: Tensor, out: Tensor, scale: Tensor, zero_point: Tensor, top: int) -> Tensor:
    """torch.fake_quantize_per_tensor_affine(x, s, z, 0, top) bit for bit, written into out.

    That kernel is a scalar loop; these are the same float32 operations in vectorised passes:
    q = round(x * (1/s)) + z (round half to even, 1/s rounded to float32 first), NaN to code 0 as
    its fmax does, clamped to 0..top, then (q - z) * s. Integers this small are exact in float32,
    so its detour through int64 changes nothing, and no zero comes out negative in either."""
    scale = scale.float().reshape(())
    inverse, z = torch.reciprocal(scale), float(int(zero_point))
    torch.mul(x, inverse, out=out).round_().add_(z)
    out.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    return out.clamp_(0, top).sub_(z).mul_(scale)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int, out: Optional[Tensor] = None) -> Tensor:
    """x quantized and dequantized: (clamp(round(x / s) + z, 0, 2^b - 1) - z) * s.

    A per-tensor integer zero point computes exactly what torch's fused kernel does (it multiplies
    by 1/s instead of dividing by s). `out`: a buffer of the result's shape to write into, for
    searches (without autograd) that quantize many times."""
    top = 2**bits - 1
    if _per_tensor_integer(x, scale, zero_point, top):
        if x.device.type != "cpu" or _autograd_watches(x, scale):  # the kernel (and its straight-through gradient)
            return torch.fake_quantize_per_tensor_affine(x, scale.float().reshape(()), zero_point.int().reshape(()),
                                                         0, top)
        out = torch.empty_like(x) if out is None else out
        for part, part_out in _chunks(x, out):
            _fused_kernel_into(part, part_out, scale, zero_point, top)
        return out
    codes = x / scale if out is None else torch.div(x, scale, out=out)
    if not _in_place_keeps_dtype_and_shape(codes, zero_point, scale):
        codes = torch.clamp(torch.round(x / scale) + zero_point, 0, top)
        return (codes - zero_point) * scale
    return codes.round_().add_(zero_point).clamp_(0, top).sub_(zero_point).mul_(scale)


def squared_error(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int, out: Tensor) -> Tensor:
    """(fake_quantize(x) - x)^2 elementwise, computed in the buffer `out` (x's shape)."""
    top = 2**bits - 1
    if not _per_tensor_integer(x, scale, zero_point, top) or x.device.type != "cpu":
        return fake_quantize(x, scale, zero_point, bits, out).sub_(x).pow_(2)
    for part, part_out in _chunks(x, out):  # every pass over a chunk while it is in cache
        _fused_kernel_into(part, part_out, scale, zero_point, top).sub_(part).pow_(2)
    return out


def best_uniform_range(
    x: Tensor, uppers: Tensor, lowers: Tensor, bits: int, channel_dim: int, work: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Among candidate ranges (one row per candidate, one column per channel), the scale and
    zero point with the least squared quantization error, chosen per channel. `work`: a buffer of
    x's shape and dtype in which each candidate's errors are computed (by default a fresh one)."""
    shape = [1, 1]
    shape[channel_dim] = -1
    out = torch.empty_like(x) if work is None else work
    best_err = best_scale = best_zero = None
    for upper, lower in zip(uppers, lowers):
        scale, zero = range_to_scale(upper, lower, bits)
        err = squared_error(x, scale.reshape(shape), zero.reshape(shape), bits, out).sum(dim=1 - channel_dim)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


class ActivationQuantizer(nn.Module):
    """Fake-quantizes what passes through while `enabled`; the first input calibrates it."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("calibrated", torch.tensor(False))
        self.enabled = False
        # set by erq_core.float64 (quantize_as_exported): quantize x exactly as the float64 ONNX export does
        self.export_quantize: Optional[Callable[[ActivationQuantizer, Tensor], Tensor]] = None

    def calibrate(self, x: Tensor) -> None:
        raise NotImplementedError

    def quantize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def calibrate_and_quantize(self, x: Tensor) -> Tensor:
        """calibrate(x), then quantize(x); a subclass may share the work of the two."""
        self.calibrate(x)
        return self.quantize(x)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if not bool(self.calibrated):
            return self.calibrate_and_quantize(x)
        return self.quantize(x)


class UniformQuantizer(ActivationQuantizer):
    """Activation quantizer: per tensor, or per channel along the last dimension.

    While `enabled` and not yet calibrated, the first input calibrates it (the percentile search).
    """

    def __init__(self, bits: int, channels: Optional[int] = None):
        super().__init__(bits)
        shape = (channels,) if channels else (1,)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))

    @property
    def per_channel(self) -> bool:
        return self.scale.numel() > 1

    def set_per_tensor(self, scale: Tensor, zero_point: Tensor) -> None:
        self.scale = scale.reshape(1).clone()
        self.zero_point = zero_point.reshape(1).clone()
        self.calibrated.fill_(True)

    @torch.no_grad()
    def calibrate(self, x: Tensor, work: Optional[Tensor] = None) -> None:
        """The least squared error range among the percentile candidates. `work`: a float32
        buffer of x's shape for the candidates' errors (by default a fresh one)."""
        x = x.detach().float()
        rows = (lambda t: t.reshape(-1, t.shape[-1])) if self.per_channel else (lambda t: t.reshape(-1, 1))
        flat = rows(x)  # (tokens, channels)
        uppers, lowers = percentile_bounds(flat, ACTIVATION_PERCENTILES, dim=0)
        scale, zero = best_uniform_range(flat, uppers, lowers, self.bits, channel_dim=1,
                                         work=None if work is None else rows(work))
        self.scale = scale.reshape(self.scale.shape).to(self.scale)
        self.zero_point = zero.reshape(self.zero_point.shape).to(self.zero_point)
        self.calibrated.fill_(True)

    def calibrate_and_quantize(self, x: Tensor) -> Tensor:
        if (self.export_quantize is not None or x.dtype != torch.float32 or not x.is_contiguous()
                or _autograd_watches(x)):
            return super().calibrate_and_quantize(x)
        buffer = torch.empty_like(x)  # the search's work space, then the result: one allocation, not two
        self.calibrate(x, buffer)
        return fake_quantize(x, self.scale, self.zero_point, self.bits, out=buffer)

    def quantize(self, x: Tensor) -> Tensor:
        """Fake-quantize x whatever `enabled` says (used to build Xq for statistics).

        With `export_quantize` set, x is quantized as the float64 ONNX export does it (erq_core.float64)."""
        if self.export_quantize is not None:
            return self.export_quantize(self, x)
        return fake_quantize(x, self.scale, self.zero_point, self.bits)



LOG_OCTAVES = 32  # the post-softmax grid spans 2^-32 of its scale at 7 and 8 bits (and less below)


def log_steps(bits: int) -> int:
    """Codes per octave of the post-softmax quantizer: 2 (RepQ-ViT's powers of sqrt(2)) up to 6
    bits; at 7 and 8 bits as many as keep the 2^b codes spanning LOG_OCTAVES octaves (4 and 8).
    Steps of sqrt(2) err by up to 19% on every probability whatever the bits, and at 8 bits they
    reach 2^-127 of the scale, far below any attention probability: on the realistic fixture they
    were most of erq+'s W8/A8 loss (docs/accuracy.md)."""
    return max(2, 2**bits // LOG_OCTAVES)


TOKEN_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # the clipping ratios a TokenQuantizer searches
TOKEN_SEARCH_ROWS = 8192  # rows its calibration searches on: enough to rank a handful of ratios


def token_quantize(x: Tensor, bits: int, clip: Tensor, dim: int = -1) -> Tensor:
    """Dynamic asymmetric b-bit quantization with one range per row along `dim` (per token).

    Each row's range is its own [min(x, 0), max(x, 0)] times `clip`, as a deployed runtime
    computes it when the row arrives (ONNX's DynamicQuantizeLinear range, which holds 0):
    s = max((hi - lo) / (2^b - 1), 1e-8), z = round(-lo / s), x_hat = (clamp(round(x / s) + z, 0, 2^b - 1) - z) s.
    Each step is one IEEE float operation, so erq_core.onnx_export writes the same arithmetic with
    ReduceMin/ReduceMax, Div, Round, Clip and gets the same bits."""
    top = 2**bits - 1
    clip = clip.to(x)
    lower = torch.amin(x, dim=dim, keepdim=True).clamp(max=0) * clip
    upper = torch.amax(x, dim=dim, keepdim=True).clamp(min=0) * clip
    scale = ((upper - lower) / top).clamp(min=_MIN_SCALE)
    zero = torch.round(-lower / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, top) - zero) * scale


class TokenQuantizer(ActivationQuantizer):
    """Per-token dynamic activation quantizer (`--act-granularity token`): the range of each row
    along `dim` (the last dimension: a token's features; -2 for k^T's columns and v's channels) is
    read from the row itself at run time (token_quantize). Calibration only chooses `clip`, one
    clipping ratio for all rows, by least squared error on the calibration input."""

    def __init__(self, bits: int, dim: int = -1):
        super().__init__(bits)
        self.dim = dim
        self.register_buffer("clip", torch.ones(1))

    def rows(self, x: Tensor) -> Tensor:
        """x as (rows, features) with each quantization row one row, at most TOKEN_SEARCH_ROWS of them."""
        flat = x.detach().float().movedim(self.dim, -1)
        flat = flat.reshape(-1, flat.shape[-1])
        return flat[:: max(1, -(-flat.shape[0] // TOKEN_SEARCH_ROWS))]

    def choose_clip(self, error: Callable[[Tensor], float]) -> None:
        """Keep the ratio of TOKEN_CLIP_RATIOS whose clip tensor has the least `error` (the first on a tie)."""
        errors = [error(torch.tensor([ratio])) for ratio in TOKEN_CLIP_RATIOS]
        self.clip = torch.tensor([TOKEN_CLIP_RATIOS[errors.index(min(errors))]]).to(self.clip)
        self.calibrated.fill_(True)

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        rows = self.rows(x)
        self.choose_clip(lambda clip: float((token_quantize(rows, self.bits, clip) - rows).pow_(2).sum()))

    def quantize(self, x: Tensor) -> Tensor:
        if self.export_quantize is not None:
            return self.export_quantize(self, x)
        return token_quantize(x, self.bits, self.clip, self.dim)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, dim={self.dim}"


def log_sqrt2_quantize(x: Tensor, scale: Tensor, bits: int, log2_x: Optional[Tensor] = None,
                       out: Optional[Tensor] = None, underflow: Optional[Tensor] = None) -> Tensor:
    """RepQ-ViT's post-softmax quantizer: powers of sqrt(2) below the scale; deep codes become 0.

    code q = clamp(round(-n log2(x / s)), 0, 2^b - 1), value 2^(-q/n) s, with n = log_steps(b) codes
    per octave (2 below 7 bits: 2^(-ceil(q/2)) (1 + (q mod 2)(sqrt2 - 1)) s).
    `out` (float, x's shape) and `underflow` (bool) are buffers for searches that quantize many times.
    """
    levels, steps = 2**bits, log_steps(bits)
    if log2_x is None:
        log2_x = torch.log2(x)
        out = None if _autograd_watches(x) else log2_x  # a fresh tensor: the codes can be computed in it
    if not _in_place_keeps_dtype_and_shape(log2_x, scale):
        codes = torch.round(-steps * (log2_x - torch.log2(scale)))
        underflow = codes >= levels
        codes = codes.clamp(0, levels - 1)
        return (torch.exp2(codes / -steps) * scale).masked_fill_(underflow, 0.0)
    # the operations of the lines above, in one buffer
    codes = torch.sub(log2_x, torch.log2(scale), out=out) if out is not None else log2_x - torch.log2(scale)
    codes.mul_(-steps).round_()
    underflow = torch.ge(codes, levels, out=underflow) if underflow is not None else codes >= levels
    # 2^(-ceil(q/2)) (1 + (q mod 2)(sqrt2 - 1)) equals 2^(-q/2) for every integer q >= 0; 1/steps is a power of 2
    return codes.clamp_(0, levels - 1).mul_(-1.0 / steps).exp2_().mul_(scale).masked_fill_(underflow, 0.0)


def log_sqrt2_levels(scale: Tensor, bits: int) -> Tensor:
    """The float32 values of the codes 0..2^b-1 as log_sqrt2_quantize computes them, then a 0 for
    the codes past the last level."""
    scale = scale.detach().float().cpu().reshape(())
    steps = log_steps(bits)
    return torch.cat([torch.exp2(torch.arange(2**bits, dtype=torch.float32) / -steps) * scale, torch.zeros(1)])


class LogSqrt2Quantizer(ActivationQuantizer):
    """Post-softmax (attention probability) quantizer with one searched scale per tensor."""

    def __init__(self, bits: int):
        super().__init__(bits)
        self.register_buffer("scale", torch.ones(1))

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        self._search(x.detach().float().reshape(-1))

    def _search(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """Set the scale with the least squared error among the percentile candidates; return
        log2(flat) and a bool buffer of its size, for a quantization of flat that follows."""
        uppers = percentile_bounds(flat, ACTIVATION_PERCENTILES, dim=0)[0].reshape(-1).clamp(min=_MIN_SCALE)
        log2_flat = torch.log2(flat)
        out, underflow = torch.empty_like(flat), torch.empty_like(flat, dtype=torch.bool)  # shared by the candidates
        errors = [log_sqrt2_quantize(flat, u, self.bits, log2_flat, out, underflow).sub_(flat).pow_(2).sum()
                  for u in uppers]
        self.scale = uppers[int(torch.stack(errors).argmin())].reshape(1).to(self.scale)
        self.calibrated.fill_(True)
        return log2_flat, underflow

    def calibrate_and_quantize(self, x: Tensor) -> Tensor:
        if (self.export_quantize is not None or x.dtype != torch.float32 or not x.is_contiguous()
                or _autograd_watches(x)):
            return super().calibrate_and_quantize(x)
        with torch.no_grad():
            log2_flat, underflow = self._search(x.reshape(-1))
        # quantize(x), with the log2 the search computed and its buffer for the result
        return log_sqrt2_quantize(x, self.scale, self.bits, log2_flat, log2_flat, underflow).view(x.shape)

    def quantize(self, x: Tensor) -> Tensor:
        if self.export_quantize is not None:
            return self.export_quantize(self, x)
        return log_sqrt2_quantize(x, self.scale, self.bits)



def outlier_columns(weight: Tensor, count: int) -> Tensor:
    """The `count` input columns that most often hold a row's extreme values.

    A value is extreme when it lies above its row's 99th percentile of positive entries or below
    the 1st percentile of its negative entries (the TPAMI two-part weight split).
    """
    w = weight.detach().float()
    pos = torch.where(w > 0, w, torch.nan)
    neg = torch.where(w < 0, w, torch.nan)
    hi = torch.nanquantile(pos, 0.99, dim=1, keepdim=True)
    lo = torch.nanquantile(neg, 0.01, dim=1, keepdim=True)
    extreme = (w > hi.nan_to_num(float("inf"))) | (w < lo.nan_to_num(float("-inf")))
    return extreme.sum(dim=0).topk(count, sorted=False).indices.sort().values


class WeightQuantizer(nn.Module):
    """Per-output-channel uniform weight quantizer over a 2-D (d_out, d_in) view of the weight.

    With `groups == 2`, every input column belongs to group 0 (ordinary) or 1 (outlier), and each
    row has one scale and zero point per group.
    """

    def __init__(self, bits: int, out_features: int, in_features: int, groups: int = 1):
        super().__init__()
        self.bits = bits
        self.register_buffer("scale", torch.ones(out_features, groups))
        self.register_buffer("zero_point", torch.zeros(out_features, groups))
        self.register_buffer("column_group", torch.zeros(in_features, dtype=torch.long))
        self.register_buffer("calibrated", torch.tensor(False))

    @property
    def groups(self) -> int:
        return self.scale.shape[1]

    def column_scale(self) -> tuple[Tensor, Tensor]:
        """Scale and zero point expanded to (d_out, d_in): each column's own group (with one group,
        a broadcast view instead of a copy: the same values)."""
        if self.groups == 1:
            shape = (self.scale.shape[0], self.column_group.numel())
            return self.scale.expand(shape), self.zero_point.expand(shape)
        return self.scale[:, self.column_group], self.zero_point[:, self.column_group]

    @torch.no_grad()
    def calibrate(self, weight: Tensor, hessian: Optional[Tensor] = None) -> None:
        """Each row's range by least squared error over the percentile candidates; with `hessian`
        (the layer's input Gram matrix H) then refined per row and group by least output error
        d H d^T (d the row's rounding error) among finer candidates."""
        w = weight.detach().reshape(weight.shape[0], -1).float()
        if self.groups == 2:
            column_group = torch.zeros(w.shape[1], dtype=torch.long, device=w.device)
            column_group[outlier_columns(w, max(1, w.shape[0] // 20))] = 1
            self.column_group = column_group
        for group in range(self.groups):
            cols = (self.column_group == group).nonzero().squeeze(1)
            scale, zero = self._search_range(w[:, cols])
            self.scale[:, group] = scale
            self.zero_point[:, group] = zero
        if hessian is not None:
            self._search_output_aware(w, hessian.float())
        self.calibrated.fill_(True)

    def _search_output_aware(self, w: Tensor, H: Tensor) -> None:
        H = H / torch.diagonal(H).mean().clamp(min=1e-30)
        for group in range(self.groups):
            cols = (self.column_group == group).nonzero().squeeze(1)
            error = self.forward(w) - w
            best = ((error @ H) * error).sum(dim=1)
            part = w[:, cols]
            uppers, lowers = percentile_bounds(part, WEIGHT_PERCENTILES, dim=1)
            shrink = torch.tensor(CLIP_SHRINK, device=w.device)[:, None]
            uppers = torch.cat([uppers, part.max(dim=1).values[None] * shrink])
            lowers = torch.cat([lowers, part.min(dim=1).values[None] * shrink])
            for upper, lower in zip(uppers, lowers):
                scale, zero = range_to_scale(upper, lower, self.bits)
                trial = error.clone()
                trial[:, cols] = fake_quantize(part, scale[:, None], zero[:, None], self.bits) - part
                err = ((trial @ H) * trial).sum(dim=1)
                better = err < best
                if bool(better.any()):
                    best = torch.where(better, err, best)
                    self.scale[better, group] = scale[better].to(self.scale)
                    self.zero_point[better, group] = zero[better].to(self.zero_point)
                    error[better] = trial[better]

    def _search_range(self, w: Tensor) -> tuple[Tensor, Tensor]:
        uppers, lowers = percentile_bounds(w, WEIGHT_PERCENTILES, dim=1)  # (P, d_out)
        return best_uniform_range(w, uppers, lowers, self.bits, channel_dim=0)

    def codes(self, weight: Tensor) -> Tensor:
        """Integer codes (as int64) of a (d_out, d_in) weight."""
        scale, zero = self.column_scale()
        w = weight.reshape(weight.shape[0], -1)
        return torch.clamp(torch.round(w / scale) + zero, 0, 2**self.bits - 1).long()

    def dequantize(self, codes: Tensor) -> Tensor:
        scale, zero = self.column_scale()
        return (codes.to(scale.dtype) - zero) * scale

    def forward(self, weight: Tensor) -> Tensor:
        w2d = weight.reshape(weight.shape[0], -1)
        scale, zero = self.column_scale()
        return fake_quantize(w2d, scale.to(w2d.dtype), zero.to(w2d.dtype), self.bits).reshape(weight.shape)

    def rounding_errors(self, w2d: Tensor, columns: slice) -> tuple[Tensor, Tensor, Tensor]:
        """For columns of a (d_out, d_in) weight: errors of nearest, floor and ceil rounding."""
        scale, zero = self.column_scale()
        scale = scale[:, columns].to(w2d.dtype)
        zero = zero[:, columns].to(w2d.dtype)
        w = w2d[:, columns]
        top = 2**self.bits - 1
        scaled = w / scale
        nearest = (torch.clamp(torch.round(scaled) + zero, 0, top) - zero) * scale - w
        floor = (torch.clamp(torch.floor(scaled) + zero, 0, top) - zero) * scale - w
        ceil = (torch.clamp(torch.ceil(scaled) + zero, 0, top) - zero) * scale - w
        return nearest, floor, ceil
