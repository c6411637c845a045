"""Sequential (asymmetric) statistics: quantize block by block against full-precision targets.

ERQ takes every layer's statistics from the full-precision (FP) model, so each layer is corrected
for its own input quantizer only. Here (GPTAQ's formulation) a layer's input X~ comes from the
already quantized upstream model while its target stays the FP output Y = Xa Wa^T:
    H = Q(X~)a^T Q(X~)a,    K = Q(X~)a^T Xa,
so Aqer's ridge solve also absorbs the error accumulated upstream, and Wqer works on the inputs
the layer really sees.

The driver walks the model's chain of blocks (ViT/DeiT blocks; Swin's downsampling layers and
blocks), keeping the current block's input on both paths (FP and quantized), one tensor per
calibration batch: 2 x images x tokens x width floats. One FP forward of a block gives what all
its layers' statistics need from the FP path (`fp_targets`; for a ViT block 4 x images x tokens x
width more floats), so the FP path is not recomputed up to each layer. That is the memory that
grows with the calibration size. Within a block, modules are taken in the order they run: an attention matmul's
operand quantizers and a linear layer's input quantizer may be re-calibrated on the quantized
path (`calibrate_quantizers`), then the linear layer's statistics are accumulated batch by batch
and solved; only one layer's statistics are alive at a time.
"""
from __future__ import annotations

import itertools
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from erq_core.errors import ModelLoadError
from erq_core.qmodules import QuantConv2d, QuantLinear, QuantMatMul
from erq_core.stats import FoldedStats, FPRows, LayerStats

LayerSolver = Callable[[str, nn.Module, LayerStats, Optional[FoldedStats]], dict]
QuantizerCalibration = Callable[[nn.Module, nn.Module, Tensor], None]  # (unit, linear or matmul, unit input)
BlockHook = Callable[[str, nn.Module, list[Tensor], list[Tensor]], None]  # (name, block, inputs, FP targets)


class _StopForward(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is not computed."""


def transformer_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The chain of modules each of which feeds the next one: what is quantized one at a time."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential):  # VisionTransformer, DeiT
        return [(f"blocks.{i}", block) for i, block in enumerate(blocks)]
    stages = getattr(model, "layers", None)
    if isinstance(stages, nn.Sequential):  # Swin: each stage downsamples, then runs its blocks
        units = []
        for i, stage in enumerate(stages):
            if not isinstance(stage.downsample, nn.Identity):
                units.append((f"layers.{i}.downsample", stage.downsample))
            units += [(f"layers.{i}.blocks.{j}", block) for j, block in enumerate(stage.blocks)]
        return units
    raise ModelLoadError(f"method erq+ does not know the block structure of {type(model).__name__}; "
                         "use --method erq")


def call_arguments(module: nn.Module, x: Tensor, target: nn.Module) -> tuple:
    """The positional arguments `target` receives when `module` runs on x (the run stops there)."""
    seen: dict[str, tuple] = {}

    def hook(_module: nn.Module, args: tuple) -> None:
        seen["args"] = args
        raise _StopForward

    handle = target.register_forward_pre_hook(hook)
    try:
        module(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "args" not in seen:
        raise RuntimeError(f"{type(target).__name__} did not run inside {type(module).__name__}")
    return seen["args"]


def input_and_output(module: nn.Module, x: Tensor, layer: nn.Module) -> tuple[Tensor, Tensor]:
    """(input, output) of `layer` when `module` runs on x, without computing what comes after."""
    seen: dict[str, Tensor] = {}

    def hook(_module: nn.Module, inputs: tuple, output: Tensor) -> None:
        seen["input"], seen["output"] = inputs[0], output
        raise _StopForward

    handle = layer.register_forward_hook(hook)
    try:
        module(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return seen["input"], seen["output"]


def execution_order(unit: nn.Module, x: Tensor, prefix: str) -> list[tuple[str, nn.Module]]:
    """The linear layers and attention matmuls of `unit` in the order they run on x."""
    names = {module: f"{prefix}.{name}" for name, module in unit.named_modules()
             if isinstance(module, (QuantLinear, QuantMatMul))}
    order: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda m, a: order.append(m) if m not in order else None) for m in names]
    try:
        unit(x)
    finally:
        for handle in handles:
            handle.remove()
    return [(names[m], m) for m in order]


def leading_images(batches: list[Tensor], images: int) -> list[Tensor]:
    """The leading batches holding the first `images` images."""
    kept, seen = [], 0
    for batch in batches:
        if seen >= images:
            break
        kept.append(batch[: images - seen])
        seen += kept[-1].shape[0]
    return kept


def fp_targets(fp_unit: nn.Module, fp_layers: dict[str, QuantLinear], fp_inputs: list[Tensor],
               stats_images: int) -> tuple[dict[str, list[FPRows]], list[Tensor]]:
    """One FP forward of `fp_unit` over every batch: what the statistics of each of `fp_layers`
    need from the FP path (for the first `stats_images` images), and the unit's outputs (the next
    unit's FP inputs). This keeps 4 x images x tokens x width more floats for a ViT block than
    recomputing the FP path up to each layer, and saves those partial forwards."""
    targets: dict[str, list[FPRows]] = {name: [] for name in fp_layers}
    capturing = {"on": False}

    def capture(name: str, layer: QuantLinear) -> Callable:
        narrows = not LayerStats.keeps_cross(layer.in_features, layer.out_features)

        def hook(_module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if capturing["on"]:  # copies: what runs after the layer may change its output in place
                x, y = inputs[0], output
                targets[name].append(FPRows.of(x if narrows else x.clone(), y.clone() if narrows else y,
                                               keep_input=not narrows, keep_output=narrows))
        return hook

    def forward(x: Tensor, capture_targets: bool) -> Tensor:
        capturing["on"] = capture_targets
        return fp_unit(x)

    handles = [layer.register_forward_hook(capture(name, layer)) for name, layer in fp_layers.items()]
    outputs = []
    try:
        for x, used in itertools.zip_longest(fp_inputs, leading_images(fp_inputs, stats_images)):
            if used is not None and used.shape[0] < x.shape[0]:  # statistics from part of this batch only
                forward(used, capture_targets=True)
                outputs.append(forward(x, capture_targets=False))
            else:
                outputs.append(forward(x, capture_targets=used is not None))
    finally:
        for handle in handles:
            handle.remove()
    return targets, outputs


def asymmetric_statistics(q_unit: nn.Module, q_layer: QuantLinear, q_inputs: list[Tensor],
                          targets: list[FPRows]) -> FoldedStats:
    """The statistics of `q_layer`: inputs from the quantized path, targets from the FP path
    (`fp_targets`), batch by batch."""
    stats = FoldedStats(q_layer.in_features, q_layer.out_features, q_layer.weight.device)
    for x_q, fp in zip(q_inputs, targets, strict=True):
        seen = call_arguments(q_unit, x_q, q_layer)[0]
        stats.add_rows(q_layer.input_quantizer.quantize(seen), fp)
    return stats


def model_tail(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """What the model computes after its last unit (final norm, pooling, head), as timm's
    VisionTransformer and SwinTransformer do in forward_features and forward_head."""
    if not (isinstance(getattr(model, "norm", None), nn.Module) and callable(getattr(model, "forward_head", None))):
        raise ModelLoadError(f"method erq+ does not know what follows the blocks of {type(model).__name__}; "
                             "use --method erq")
    return lambda x: model.forward_head(model.norm(x))


def trailing_statistics(q_model: nn.Module, fp_model: nn.Module, names: list[str],
                        q_outputs: list[Tensor], fp_outputs: list[Tensor]) -> dict[str, FoldedStats]:
    """Asymmetric statistics of the layers after the last unit (the head), from the last unit's
    outputs on both paths."""
    q_modules, fp_modules = dict(q_model.named_modules()), dict(fp_model.named_modules())
    stats = {name: FoldedStats(q_modules[name].in_features, q_modules[name].out_features,
                               q_modules[name].weight.device) for name in names}
    q_tail, fp_tail = model_tail(q_model), model_tail(fp_model)
    for q_output, fp_output in zip(q_outputs, fp_outputs, strict=True):
        q_seen: dict[str, Tensor] = {}
        fp_seen: dict[str, tuple[Tensor, Tensor]] = {}
        handles = [q_modules[n].register_forward_pre_hook(lambda m, a, n=n: q_seen.__setitem__(n, a[0]))
                   for n in names]
        handles += [fp_modules[n].register_forward_hook(lambda m, a, o, n=n: fp_seen.__setitem__(n, (a[0], o)))
                    for n in names]
        try:
            q_tail(q_output)
            fp_tail(fp_output)
        finally:
            for handle in handles:
                handle.remove()
        for name in names:
            fp_input, output = fp_seen[name]
            stats[name].add_batch(fp_input, q_modules[name].input_quantizer.quantize(q_seen[name]), output)
    return stats


def conv_statistics(fp_model: nn.Module, conv: QuantConv2d, batches: list[Tensor]) -> LayerStats:
    """The patch embedding's im2col statistics (its input, the image, is not quantized)."""
    stats = LayerStats(conv.weight[0].numel(), conv.weight.shape[0], conv.weight.device, input_quantized=False)
    for images in batches:
        image, output = input_and_output(fp_model, images, conv)
        cols = conv.unfold(image)
        stats.add_batch(cols, cols, output.movedim(1, -1))
    return stats


def layers_outside(model: nn.Module, units: list[tuple[str, nn.Module]]) -> tuple[list[str], list[str]]:
    """Names of the weight layers before the first block and after the last one, in model order."""
    inside = {id(m) for _, unit in units for m in unit.modules()}
    unit_ids = {id(unit) for _, unit in units}
    before, after, past_first = [], [], False
    for name, module in model.named_modules():
        past_first = past_first or id(module) in unit_ids
        if isinstance(module, (QuantLinear, QuantConv2d)) and id(module) not in inside:
            (after if past_first else before).append(name)
    return before, after


def unit_inputs(model: nn.Module, unit: nn.Module, batches: list[Tensor]) -> list[Tensor]:
    """The input of `unit` for every batch (the model stops there)."""
    return [call_arguments(model, images, unit)[0] for images in batches]


@torch.no_grad()
def quantize_sequentially(q_model: nn.Module, fp_model: nn.Module, batches: list[Tensor], stats_images: int,
                          solve: LayerSolver, calibrate_quantizers: Optional[QuantizerCalibration] = None,
                          after_block: Optional[BlockHook] = None,
                          progress: Optional[Callable[[int, int], None]] = None) -> list[dict]:
    """Quantize every weight layer of q_model in forward order with asymmetric statistics.

    `batches` are the calibration images (on the model's device); statistics use the first
    `stats_images` of them, `after_block` (reconstruction) sees them all. `solve(name, layer,
    stats, folds)` quantizes one layer in place and returns its report; the layer's weight
    quantization is switched on right after, so that what comes downstream sees it.
    """
    units = transformer_units(q_model)
    fp_units = dict(transformer_units(fp_model))
    q_modules, fp_modules = dict(q_model.named_modules()), dict(fp_model.named_modules())
    before, after = layers_outside(q_model, units)
    stats_batches = leading_images(batches, stats_images)
    total = len(before) + len(after) + sum(isinstance(m, QuantLinear) for _, u in units for m in u.modules())
    reports: list[dict] = []

    def solved(name: str, layer: nn.Module, stats: LayerStats, folds: Optional[FoldedStats]) -> None:
        reports.append(solve(name, layer, stats, folds))
        layer.quantize_weight = True
        if progress:
            progress(len(reports), total)

    for name in before:  # only the patch embedding: its input, the image, is the same on both paths
        if not isinstance(q_modules[name], QuantConv2d):
            raise ModelLoadError(f"method erq+ expects only the patch embedding before the first block, found {name}")
        solved(name, q_modules[name], conv_statistics(fp_model, fp_modules[name], stats_batches), None)

    q_inputs = unit_inputs(q_model, units[0][1], batches)
    fp_inputs = unit_inputs(fp_model, fp_units[units[0][0]], batches)
    for unit_name, q_unit in units:
        order = execution_order(q_unit, q_inputs[0][:1], unit_name)  # the order, not the values: one image
        targets, fp_outputs = fp_targets(fp_units[unit_name], {name: fp_modules[name] for name, module in order
                                                               if isinstance(module, QuantLinear)},
                                         fp_inputs, stats_images)
        for name, module in order:
            if calibrate_quantizers is not None:
                calibrate_quantizers(q_unit, module, q_inputs[0])
            if isinstance(module, QuantLinear):
                folds = asymmetric_statistics(q_unit, module, leading_images(q_inputs, stats_images), targets.pop(name))
                solved(name, module, folds.total(), folds)
        del targets
        if after_block is not None:
            after_block(unit_name, q_unit, q_inputs, fp_outputs)
        q_inputs = [q_unit(x) for x in q_inputs]
        fp_inputs = fp_outputs
    if after:
        trailing = trailing_statistics(q_model, fp_model, after, leading_images(q_inputs, stats_images),
                                       leading_images(fp_inputs, stats_images))
        for name in after:
            folds = trailing.pop(name)
            solved(name, q_modules[name], folds.total(), folds)
    return reports
