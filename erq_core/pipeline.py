"""The ERQ pipeline: quantize(model, calibration data, config) -> QuantizedModel.

Order (ERQ_ALGORITHM.md section 2): activation quantizers calibrated on 32 images with FP
weights; RepQ-ViT reparameterization; FP statistics of every layer streamed over the whole
calibration set; per layer Aqer, weight-quantizer calibration on the updated weights, Wqer.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from erq_core.aqer import aqer_update
from erq_core.config import ErqConfig
from erq_core.qmodules import QuantConv2d, QuantLinear, convert_model, set_quant_state, weight_layers
from erq_core.quantizers import WeightQuantizer
from erq_core.reparam import find_norm_linear_pairs, reparameterize
from erq_core.stats import LayerStats
from erq_core.wqer import wqer_update

log = logging.getLogger("erq")
Progress = Callable[[str, int, int], None]
ACTIVATION_CALIBRATION_IMAGES = 32
HEAD_AQER_LAMBDA = 0.1


@dataclass
class QuantizedModel:
    """A quantized timm model and what was done to it."""

    model: nn.Module
    config: ErqConfig
    norm_linear_pairs: dict[str, str]
    two_part_layers: list[str]
    layers: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - start, 3)


def _images(batch) -> Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def first_images(calibration: Iterable, count: int, device: torch.device) -> Tensor:
    taken, seen = [], 0
    for batch in calibration:
        images = _images(batch)
        taken.append(images[: count - seen])
        seen += taken[-1].shape[0]
        if seen >= count:
            break
    if not taken:
        raise ValueError("the calibration set is empty")
    return torch.cat(taken).to(device)


@torch.no_grad()
def quantize(
    model: nn.Module,
    calibration: Iterable,
    config: ErqConfig,
    progress: Optional[Progress] = None,
) -> QuantizedModel:
    """Quantize `model` in place. `calibration` yields image batches (or (images, labels)) and
    must be iterable more than once; it is streamed, never held in memory."""
    progress = progress or _no_progress
    seconds: dict[str, float] = {}
    device = next(model.parameters()).device
    model.eval()
    repq = config.method in ("erq", "repq")

    with _timed(seconds, "calibrate_activations"):
        progress("calibrate_activations", 0, 1)
        init_images = first_images(calibration, ACTIVATION_CALIBRATION_IMAGES, device)
        pairs = find_norm_linear_pairs(model, init_images[:1])
        convert_model(model, config.a_bits, config.w_bits, set(pairs) if repq else set(), set(pairs), repq)
        model.to(device)
        set_quant_state(model, activations=True, weights=False)
        model(init_images)
        del init_images
        progress("calibrate_activations", 1, 1)

    if repq:
        with _timed(seconds, "reparameterize"):
            reparameterize(model, pairs)
            log.info("reparameterized %d LayerNorm -> linear pairs", len(pairs))

    with _timed(seconds, "collect_statistics"):
        stats = collect_statistics(model, calibration, progress)

    layers = []
    named = list(weight_layers(model))
    for stage in ("aqer", "calibrate_weights", "wqer"):
        seconds.setdefault(stage, 0.0)
    for index, (name, layer) in enumerate(named):
        layers.append(_quantize_layer(name, layer, stats.pop(name), config, seconds))
        for stage in ("aqer", "calibrate_weights", "wqer"):
            progress(stage, index + 1, len(named))
    set_quant_state(model, activations=True, weights=True)
    return QuantizedModel(model, config, pairs, sorted(pairs), layers, seconds)


def collect_statistics(model: nn.Module, calibration: Iterable, progress: Progress) -> dict[str, LayerStats]:
    """One FP forward pass over the calibration set; hooks accumulate each layer's statistics."""
    set_quant_state(model, activations=False, weights=False)
    device = next(model.parameters()).device
    stats: dict[str, LayerStats] = {}
    hooks = []
    for name, layer in weight_layers(model):
        if isinstance(layer, QuantLinear):
            stats[name] = LayerStats(layer.in_features, layer.out_features, device)
            hooks.append(layer.register_forward_hook(_linear_hook(stats[name])))
        else:
            stats[name] = LayerStats(layer.weight[0].numel(), layer.weight.shape[0], device, input_quantized=False)
            hooks.append(layer.register_forward_hook(_conv_hook(stats[name])))
    total = len(calibration) if hasattr(calibration, "__len__") else 0
    try:
        for done, batch in enumerate(calibration, start=1):
            model(_images(batch).to(device))
            progress("collect_statistics", done, total)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def _linear_hook(stats: LayerStats):
    def hook(module: QuantLinear, inputs, output):
        x = inputs[0]
        stats.token_input = x.dim() > 2
        stats.add_batch(x, module.input_quantizer.quantize(x), output)
    return hook


def _conv_hook(stats: LayerStats):
    def hook(module: QuantConv2d, inputs, output):
        cols = module.unfold(inputs[0])
        stats.add_batch(cols, cols, output.movedim(1, -1))
    return hook


def _augmented_weight(layer: nn.Module) -> Tensor:
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
    if layer.bias is None:
        return w
    return torch.cat([w, layer.bias.detach().double()[:, None]], dim=1)


def _write_weight(layer: nn.Module, weight: Tensor) -> None:
    d_in = layer.weight[0].numel()
    layer.weight.copy_(weight[:, :d_in].reshape(layer.weight.shape))
    if layer.bias is not None:
        layer.bias.copy_(weight[:, d_in])


def _quantized_view(quantizer: WeightQuantizer, weight: Tensor) -> Tensor:
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


def _quantize_layer(name: str, layer: nn.Module, stats: LayerStats, config: ErqConfig, seconds: dict) -> dict:
    has_bias = layer.bias is not None
    reference = _augmented_weight(layer)
    H, cross = stats.gram(has_bias), stats.output_cross(reference, has_bias)
    weight = reference
    quantizer = layer.weight_quantizer
    d_out, d_in = reference.shape[0], layer.weight[0].numel()
    is_linear = isinstance(layer, QuantLinear)

    def error(w: Tensor) -> float:
        return relative_output_error(w, H, cross, stats.output_sq)

    round_to_nearest = WeightQuantizer(quantizer.bits, d_out, d_in, quantizer.groups).to(reference.device)
    round_to_nearest.calibrate(reference[:, :d_in])
    report = {"name": name, "rtn": error(_quantized_view(round_to_nearest, reference)), "aqer": None, "wqer": None}

    if config.uses_aqer and is_linear:
        with _timed(seconds, "aqer"):
            lam = 0.1 * config.coe if stats.token_input else HEAD_AQER_LAMBDA
            weight = aqer_update(weight, H, cross, lam)
            _write_weight(layer, weight)
    with _timed(seconds, "calibrate_weights"):
        quantizer.calibrate(weight[:, :d_in])
    if config.uses_aqer and is_linear:
        report["aqer"] = error(_quantized_view(quantizer, weight))
    if config.uses_wqer:
        with _timed(seconds, "wqer"):
            lam = 0.1 * config.coe if is_linear else config.coe
            # the paper's code refines the rounding of linear layers only, not the patch embedding
            weight = wqer_update(weight, H, quantizer, lam, stats.count, refine=is_linear)
            _write_weight(layer, weight)
        report["wqer"] = error(_quantized_view(quantizer, weight))
    return report
