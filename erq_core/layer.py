"""One layer's solve: Aqer, weight-quantizer calibration, Wqer, and the errors after each step.

The method decides a `LayerPlan` (ridge strengths, whether to refine roundings, how to choose
clipping ranges); `solve_layer` carries it out on the layer's statistics and reports the relative
output error after round-to-nearest, after Aqer and after Wqer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from erq_core.aqer import aqer_update
from erq_core.qmodules import QuantLinear
from erq_core.quantizers import WeightQuantizer
from erq_core.stats import LayerStats
from erq_core.timing import timed
from erq_core.wqer import wqer_update


@dataclass(frozen=True)
class LayerPlan:
    aqer_lambda: Optional[float]  # None: no Aqer
    wqer_lambda: Optional[float]  # None: no Wqer (round-to-nearest)
    refine_rounding: bool = True
    output_aware_clipping: bool = False  # weight ranges by d H d^T instead of weight MSE


def augmented_weight(layer: nn.Module) -> Tensor:
    """[W, b] in float64, the weight flattened to (d_out, d_in) (a convolution's im2col view)."""
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
    if layer.bias is None:
        return w
    return torch.cat([w, layer.bias.detach().double()[:, None]], dim=1)


def write_weight(layer: nn.Module, weight: Tensor) -> None:
    d_in = layer.weight[0].numel()
    layer.weight.copy_(weight[:, :d_in].reshape(layer.weight.shape))
    if layer.bias is not None:
        layer.bias.copy_(weight[:, d_in])


def quantized_view(quantizer: WeightQuantizer, weight: Tensor) -> Tensor:
    """The augmented weight with its weight columns fake-quantized (the bias stays FP)."""
    d_in = quantizer.column_group.numel()
    out = weight.clone()
    out[:, :d_in] = quantizer(weight[:, :d_in].float()).double()
    return out


def relative_output_error(weight: Tensor, H: Tensor, output_cross: Tensor, output_sq: float) -> float:
    """||Xqa A^T - Y||^2 / ||Y||^2 from the statistics alone (A = weight, Y the FP output).

    Expanded: tr(A H A^T) - 2 tr(A Xqa^T Y) + ||Y||^2.
    """
    err = ((weight @ H) * weight).sum() - 2 * (weight * output_cross.T).sum() + output_sq
    return float(err.clamp(min=0) / max(output_sq, 1e-30))


@torch.no_grad()
def solve_layer(name: str, layer: nn.Module, stats: LayerStats, plan: LayerPlan, seconds: dict[str, float]) -> dict:
    """Quantize one layer's weights in place as `plan` says; return its per-step errors."""
    has_bias = layer.bias is not None
    reference = augmented_weight(layer)
    H, cross = stats.gram(has_bias), stats.output_cross(reference, has_bias)
    quantizer = layer.weight_quantizer
    d_out, d_in = reference.shape[0], layer.weight[0].numel()

    def error(w: Tensor) -> float:
        return relative_output_error(w, H, cross, stats.output_sq)

    def calibrate(q: WeightQuantizer, w: Tensor) -> None:
        q.calibrate(w[:, :d_in], hessian=H[:d_in, :d_in] if plan.output_aware_clipping else None)

    report = {"name": name, "rtn": None, "aqer": None, "wqer": None}
    uses_aqer = plan.aqer_lambda is not None and isinstance(layer, QuantLinear)  # never the patch embedding
    if uses_aqer:  # the weights change before the quantizer is calibrated: round-to-nearest needs its own
        # the report's baseline is plain round-to-nearest: weight-MSE ranges, as rtn would choose
        round_to_nearest = WeightQuantizer(quantizer.bits, d_out, d_in, quantizer.groups).to(reference.device)
        round_to_nearest.calibrate(reference[:, :d_in])
        report["rtn"] = error(quantized_view(round_to_nearest, reference))

    weight = reference
    if uses_aqer:
        with timed(seconds, "aqer"):
            weight = aqer_update(weight, H, cross, plan.aqer_lambda)
            write_weight(layer, weight)
    with timed(seconds, "calibrate_weights"):
        calibrate(quantizer, weight)
    if uses_aqer:
        report["aqer"] = error(quantized_view(quantizer, weight))
    else:
        report["rtn"] = error(quantized_view(quantizer, weight))
    if plan.wqer_lambda is not None:
        with timed(seconds, "wqer"):
            weight = wqer_update(weight, H, quantizer, plan.wqer_lambda, stats.count, refine=plan.refine_rounding)
            write_weight(layer, weight)
        report["wqer"] = error(quantized_view(quantizer, weight))
    return report
