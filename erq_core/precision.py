"""Per-layer precision: the bit width of each quantized matrix product, read from and written to
its quantizers.

A "layer" here is a matrix product with its own quantizers: a linear layer (its weight and its
input), the patch embedding (its weight; the image is not quantized) and an attention matmul (its
two operands). `--max-drop` (erq_core/budget.py) raises some layers to 8 bits; checkpoints save
every layer's bits so that loading a run rebuilds the same model, and every export reads the bits
from the quantizers themselves.
"""
from __future__ import annotations

from typing import Iterator, Optional

from torch import nn

from erq_core.qmodules import QuantConv2d, QuantLinear, QuantMatMul

PRECISION_LAYERS = (QuantLinear, QuantConv2d, QuantMatMul)


def precision_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every layer with its own bit width, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, PRECISION_LAYERS):
            yield name, module


def layer_bits(module: nn.Module) -> dict[str, Optional[int]]:
    """{"w_bits", "a_bits"} of one layer (None where it has no such quantizer)."""
    if isinstance(module, QuantLinear):
        return {"w_bits": module.weight_quantizer.bits, "a_bits": module.input_quantizer.bits}
    if isinstance(module, QuantConv2d):
        return {"w_bits": module.weight_quantizer.bits, "a_bits": None}
    if isinstance(module, QuantMatMul):
        return {"w_bits": None, "a_bits": module.a_quantizer.bits}
    raise TypeError(f"{type(module).__name__} has no bit width")


def model_precision(model: nn.Module) -> list[dict]:
    """[{"name", "w_bits", "a_bits"}] for every layer, in model order (metrics.json, config.json)."""
    return [{"name": name, **layer_bits(module)} for name, module in precision_layers(model)]


def set_layer_bits(module: nn.Module, w_bits: Optional[int], a_bits: Optional[int]) -> None:
    """Set the bit widths of one layer's quantizers (before they are calibrated or loaded)."""
    if isinstance(module, (QuantLinear, QuantConv2d)) and w_bits is not None:
        module.weight_quantizer.bits = w_bits
        module._cache = None
    if isinstance(module, QuantLinear) and a_bits is not None:
        module.input_quantizer.bits = a_bits
    if isinstance(module, QuantMatMul) and a_bits is not None:
        module.a_quantizer.bits = module.b_quantizer.bits = a_bits


def apply_precision(model: nn.Module, precision: list[dict]) -> None:
    """Give every layer named in `precision` its recorded bit widths."""
    modules = dict(model.named_modules())
    for entry in precision:
        set_layer_bits(modules[entry["name"]], entry.get("w_bits"), entry.get("a_bits"))

