"""The quantized model evaluated in float64: the arithmetic of the float64 ONNX export.

At W4/A4 a real ViT is chaotic at the last float bit: a value that lies on a rounding boundary
gets the neighbouring code, and the difference grows about tenfold per block. Two float32
runtimes (torch and onnxruntime, or two kernels of one) then land a point or two apart in top-1.
In float64 the computations agree to about 1e-16, so such a tie essentially never happens.

What is float64 and what is not, on both sides (torch here, onnxruntime in the float64 export):
- every operator between quantizers (matrix products, LayerNorm, softmax, GELU, residual adds);
- a uniform activation quantizer casts its input to float32 and quantizes there exactly as
  QuantizeLinear -> DequantizeLinear does (quantizers.onnx_fake_quantize), then back to float64;
- the log-sqrt2 quantizer computes its code in float64 (quantizers.log_sqrt2_quantize_float64);
- weights are the float32 dequantized codes, as DequantizeLinear gives them, cast to float64.
Images go in and logits come out as float32, like the float32 model. to_float64 sets each
quantizer's `as_float64_export`, which selects those two ways of quantizing.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from erq_core.config import PRECISIONS
from erq_core.qmodules import activation_quantizers, weight_layers


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
        quantizer.as_float64_export = True
    return Float64Model(model.double()).eval()


def with_precision(model: nn.Module, precision: str) -> nn.Module:
    """`model` itself for float32, to_float64(model) for float64."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return to_float64(model) if precision == "float64" else model
