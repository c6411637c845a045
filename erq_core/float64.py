"""The quantized model evaluated in float64: the arithmetic of the float64 ONNX export.

At W4/A4 a real ViT is chaotic at the last float bit: a value that lies on a rounding boundary
gets the neighbouring code, and the difference grows about tenfold per block. Two float32
runtimes (torch and onnxruntime, or two kernels of one) then land a point or two apart in top-1.
In float64 the computations agree to about 1e-16, so such a tie essentially never happens.

What is float64 and what is not, on both sides (torch here, onnxruntime in the float64 export):
- every operator between quantizers (matrix products, LayerNorm, softmax, GELU, residual adds);
- a uniform activation quantizer casts its input to float32 and quantizes there exactly as
  QuantizeLinear -> DequantizeLinear does (onnx_fake_quantize, below), then back to float64;
- the log-sqrt2 quantizer computes its code in float64 (log_sqrt2_quantize_float64, below);
- a per-token quantizer (TokenQuantizer) casts to float32 and computes token_quantize there;
- weights are the float32 dequantized codes, as DequantizeLinear gives them, cast to float64.
Images go in and logits come out as float32, like the float32 model. to_float64 sets each
quantizer's `export_quantize` to the one of those two ways that fits it (quantize_as_exported).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from erq_core.config import PRECISIONS
from erq_core.qmodules import activation_quantizers, weight_layers
from erq_core.quantizers import (ActivationQuantizer, LogSqrt2Quantizer, TokenQuantizer, integer_in, log_sqrt2_levels,
                                 log_steps, token_quantize)


def onnx_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """fake_quantize in float32 exactly as the ONNX export's QuantizeLinear -> DequantizeLinear
    computes it, bit for bit: x / s (not torch's fused x * (1/s)), and a fractional zero point Z as
    round(x / s) s clipped to -Z s and (2^b - 1 - Z) s (an INT16 pair with zero point 0)."""
    x, scale, zero_point = x.float(), scale.float(), zero_point.float()
    top = 2**bits - 1
    if scale.numel() == 1 and not integer_in(float(zero_point), top):
        return torch.clamp(torch.round(x / scale) * scale, (0 - zero_point) * scale, (top - zero_point) * scale)
    return (torch.clamp(torch.round(x / scale) + zero_point, 0, top) - zero_point) * scale


def log_sqrt2_quantize_float64(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """log_sqrt2_quantize of a float64 x, exactly as the float64 ONNX export computes it:
    code clamp(round(-n (ln x / ln 2 - log2 s)), 0, 2^b) in float64 (n = log_steps(b)), looked up in
    log_sqrt2_levels."""
    log2_scale = torch.log2(scale.detach().float().reshape(())).double()
    codes = torch.round((torch.log(x) / math.log(2) - log2_scale) * -float(log_steps(bits))).clamp(0, 2**bits)
    return log_sqrt2_levels(scale, bits).to(x.device).double()[codes.long()]


def _uniform_as_exported(quantizer: ActivationQuantizer, x: Tensor) -> Tensor:
    return onnx_fake_quantize(x, quantizer.scale, quantizer.zero_point, quantizer.bits).to(x.dtype)


def _log_sqrt2_as_exported(quantizer: ActivationQuantizer, x: Tensor) -> Tensor:
    return log_sqrt2_quantize_float64(x.double(), quantizer.scale, quantizer.bits).to(x.dtype)


def _token_as_exported(quantizer: ActivationQuantizer, x: Tensor) -> Tensor:
    """Per token in float32, as the export's ReduceMin/ReduceMax ... Round ... Mul do it."""
    return token_quantize(x.float(), quantizer.bits, quantizer.clip.float(), quantizer.dim).to(x.dtype)


def quantize_as_exported(quantizer: ActivationQuantizer) -> None:
    """From now on `quantizer` quantizes exactly as the float64 ONNX export does (its input comes
    back in its own dtype)."""
    if isinstance(quantizer, TokenQuantizer):
        quantizer.export_quantize = _token_as_exported
        return
    quantizer.export_quantize = _log_sqrt2_as_exported if isinstance(quantizer, LogSqrt2Quantizer) \
        else _uniform_as_exported


class Float64Model(nn.Module):
    """float32 images in, float32 logits out; the wrapped model computes in float64."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images.double()).float()


def to_float64(model: nn.Module) -> Float64Model:
    """The quantized `model` (changed in place) wrapped to compute in float64.

    Each quantized layer's weight becomes its float32 fake-quantized weight (the dequantized
    codes) in float64, so the weight quantizers are no longer needed; everything else is cast."""
    with torch.no_grad():
        for _, layer in weight_layers(model):
            if layer.quantize_weight:
                layer.weight.data = layer.weight_quantizer(layer.weight.float())
                layer.quantize_weight = False
                layer._cache = None
    for quantizer in activation_quantizers(model):
        quantize_as_exported(quantizer)
    return Float64Model(model.double()).eval()


def with_precision(model: nn.Module, precision: str) -> nn.Module:
    """`model` itself for float32, to_float64(model) for float64."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return to_float64(model) if precision == "float64" else model
