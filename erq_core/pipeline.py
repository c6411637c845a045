"""The pipeline: quantize(model, calibration data, config) -> QuantizedModel.

Every method starts alike: the model's matrix products are swapped for quantized ones and the
activation quantizers are calibrated on 32 images with FP weights; erq, erq+ and repq then fold
the RepQ-ViT reparameterization. After that:
- rtn, repq: each layer's weights rounded to nearest;
- erq (the paper, docs/algorithm.md): FP statistics of every layer streamed over the calibration
  set, then per layer Aqer, weight-quantizer calibration on the updated weights, Wqer;
- erq+: block by block on the partly quantized model (erq_core/erq_plus.py).
With rotate, the FP model is first rotated (erq_core/rotation.py), which leaves its output unchanged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from erq_core.balance import BALANCED_FLAG, QK_BALANCED_FLAG, balance_attention_outputs, balance_queries_and_keys
from erq_core.config import QuantRecipe
from erq_core.layer import LayerPlan, solve_layer
from erq_core.qmodules import (QuantConv2d, QuantLinear, convert_model, dynamic_inputs, set_quant_state,
                               weight_layers)
from erq_core.reparam import find_norm_linear_pairs, reparameterize
from erq_core.rotation import RotationPlan, rotate_model
from erq_core.stats import LayerStats
from erq_core.timing import timed

log = logging.getLogger("erq")
Progress = Callable[[str, int, int], None]
ACTIVATION_CALIBRATION_IMAGES = 32
HEAD_AQER_LAMBDA = 0.1


@dataclass
class QuantizedModel:
    """A quantized timm model and what was done to it."""

    model: nn.Module
    config: QuantRecipe
    norm_linear_pairs: dict[str, str]
    two_part_layers: list[str]
    layers: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    budget: Optional[dict] = None  # what --max-drop searched and found (erq_core/budget.py)


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


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


def _balancings(model: nn.Module, config: QuantRecipe) -> tuple[bool, bool]:
    """(outputs, queries and keys): which of erq_core.balance's folds the FP model is to get, where the
    method asks for them at these activation bits and not with --rotate, once (a --max-drop run's
    copies come balanced)."""
    if config.rotate:
        return False, False
    spec = config.method_spec
    return (config.a_bits < spec.balance_below_a_bits and not getattr(model, BALANCED_FLAG, False),
            config.a_bits < spec.balance_qk_below_a_bits and not getattr(model, QK_BALANCED_FLAG, False))


def wants_balance(model: nn.Module, config: QuantRecipe) -> bool:
    return any(_balancings(model, config))


def balance(model: nn.Module, images: Tensor, config: QuantRecipe) -> None:
    outputs, queries_keys = _balancings(model, config)
    if outputs:
        log.info("balanced the output channels of %d attentions", len(balance_attention_outputs(model, images)))
    if queries_keys:
        log.info("balanced the queries and keys of %d attentions", len(balance_queries_and_keys(model, images)))


@torch.no_grad()
def quantize(
    model: nn.Module,
    calibration: Iterable,
    config: QuantRecipe,
    progress: Optional[Progress] = None,
    rotation_plan: Optional[RotationPlan] = None,
) -> QuantizedModel:
    """Quantize `model` in place. `calibration` yields image batches (or (images, labels)) and
    must be iterable more than once; it is streamed, never held in memory. With config.rotate the
    FP model is rotated first (erq_core/rotation.py; `rotation_plan` picks the rotations, for
    ablations)."""
    progress = progress or _no_progress
    seconds: dict[str, float] = {}
    device = next(model.parameters()).device
    model.eval()
    method = config.method_spec
    repq = method.reparameterized
    if config.rotate:
        rotation_plan = rotation_plan or RotationPlan()
        with timed(seconds, "rotate"):
            rotate_model(model, config.seed, rotation_plan)
    token = config.act_granularity == "token"
    # with act_granularity token the fold still comes first, then those inputs go per token
    # (measured: docs/algorithm.md, "Per-token activations")
    fold = repq and (rotation_plan is None or rotation_plan.repq_fold)

    with timed(seconds, "calibrate_activations"):
        progress("calibrate_activations", 0, 1)
        init_images = first_images(calibration, ACTIVATION_CALIBRATION_IMAGES, device)
        if wants_balance(model, config):
            balance(model, init_images, config)
        pairs = find_norm_linear_pairs(model, init_images[:1])
        two_part = set(pairs) if config.w_bits < method.two_part_below_bits else set()
        convert_model(model, config.a_bits, config.w_bits, set(pairs) if fold else set(), two_part, repq,
                      config.act_granularity)
        model.to(device)
        set_quant_state(model, activations=True, weights=False)
        model(init_images)
        progress("calibrate_activations", 1, 1)

    if fold:
        with timed(seconds, "reparameterize"):
            # the papers' code keeps the fractional mean zero point; erq+ keeps true b-bit quantizers
            reparameterize(model, pairs, integer_zero_point=method.integer_zero_point)
            log.info("reparameterized %d LayerNorm -> linear pairs", len(pairs))
        if token:  # the folded inputs go per token too, their clipping calibrated on the same images
            with timed(seconds, "calibrate_activations"):
                dynamic_inputs(model, set(pairs))
                model(init_images)
    del init_images

    if method.solver == "sequential":
        from erq_core.erq_plus import quantize_plus

        layers = quantize_plus(model, calibration, config, seconds, progress)
        set_quant_state(model, activations=True, weights=True)
        return QuantizedModel(model, config, pairs, sorted(two_part), layers, seconds)

    with timed(seconds, "collect_statistics"):
        stats = collect_statistics(model, calibration, progress)

    layers = []
    named = list(weight_layers(model))
    for stage in ("aqer", "calibrate_weights", "wqer"):
        seconds.setdefault(stage, 0.0)
    for index, (name, layer) in enumerate(named):
        layer_stats = stats.pop(name)
        layers.append(solve_layer(name, layer, layer_stats, paper_plan(layer, layer_stats.token_input, config),
                                  seconds))
        for stage in ("aqer", "calibrate_weights", "wqer"):
            progress(stage, index + 1, len(named))
    set_quant_state(model, activations=True, weights=True)
    return QuantizedModel(model, config, pairs, sorted(two_part), layers, seconds)


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


def paper_plan(layer: nn.Module, token_input: bool, config: QuantRecipe) -> LayerPlan:
    """ERQ's ridge strengths from coe (0.1 coe; Aqer 0.1 for the head's per-image input; the patch
    embedding gets Wqer only, with coe and no rounding refinement, as in the paper's code)."""
    if config.method_spec.solver != "paper":
        return LayerPlan(None, None)
    if not isinstance(layer, QuantLinear):
        return LayerPlan(None, config.coe if config.wqer else None, refine_rounding=False)
    aqer = (0.1 * config.coe if token_input else HEAD_AQER_LAMBDA) if config.aqer else None
    return LayerPlan(aqer, 0.1 * config.coe if config.wqer else None)
