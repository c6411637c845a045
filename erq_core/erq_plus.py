"""erq+: ERQ's closed forms made more accurate at the same bit widths and quantizer types.

What it adds to `erq` (each measured on a real pretrained ViT; see the README, "Accuracy"):
- sequential, asymmetric statistics (erq_core/sequential.py): each layer is solved on the inputs
  of the already quantized upstream model against FP targets, so it absorbs upstream error;
- output-aware activation ranges (erq_core/output_aware.py), re-searched on those inputs;
- ridge strengths chosen on held-out calibration statistics (erq_core/ridge.py), not `coe`;
- weight clipping by output error d H d^T (WeightQuantizer.calibrate with the Gram matrix);
- integer zero points after the RepQ-ViT fold: every quantizer is a true b-bit one;
- optionally, block-wise output reconstruction from that solution (erq_core/reconstruct.py).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from torch import Tensor, nn

from erq_core.config import QuantRecipe
from erq_core.layer import LayerPlan, augmented_weight, solve_layer
from erq_core.output_aware import linear_input_loss, matmul_loss, search_range
from erq_core.progress import LAYERS_STAGE, RECONSTRUCT_STAGE
from erq_core.qmodules import QuantLinear, QuantMatMul, set_quant_state
from erq_core.ridge import ALPHAS, held_out_gains, mean_diagonal
from erq_core.sequential import call_arguments, leading_images, quantize_sequentially
from erq_core.stats import FoldedStats, LayerStats
from erq_core.timing import timed

log = logging.getLogger("erq")
MATMUL_SEARCH_IMAGES = 8  # attention matmul operands are large: their ranges are searched on a few images


@dataclass(frozen=True)
class PlusOptions:
    """The parts of erq+, for ablations (bench/accuracy.py); the defaults are erq+."""

    output_aware_activations: bool = True
    auto_lambda: bool = True
    output_aware_clipping: bool = True


def choose_aqer(weight: Tensor, folds: FoldedStats, with_bias: bool) -> tuple[float, bool]:
    """The alpha whose Aqer solve on one half predicts the other half's FP output best, and whether
    that solve lowers the held-out output error at all. When no alpha does (the input quantization
    error is small, as with 8-bit activations, and the update would fit the calibration images'
    noise), Aqer is skipped: it could only make the layer worse on images it has not seen."""
    first, second = folds.folds
    gains = held_out_gains(weight, first, second, with_bias, ALPHAS) + \
        held_out_gains(weight, second, first, with_bias, ALPHAS)
    best = int(gains.argmin())
    return ALPHAS[best], bool(gains[best] < 0)


def layer_plan(layer: nn.Module, stats: LayerStats, folds: Optional[FoldedStats], config: QuantRecipe,
               options: PlusOptions) -> tuple[LayerPlan, Optional[float]]:
    """How to solve one layer, and the alpha chosen for its ridge strength (None: the coe rule)."""
    clipping = options.output_aware_clipping
    if not isinstance(layer, QuantLinear):  # the patch embedding: Wqer only, on its im2col input
        wqer = config.coe if config.wqer else None
        return LayerPlan(None, wqer, refine_rounding=False, output_aware_clipping=clipping), None
    alpha, aqer_helps = None, True
    if options.auto_lambda and folds is not None:
        alpha, aqer_helps = choose_aqer(augmented_weight(layer), folds, layer.bias is not None)
        aqer = wqer = alpha * mean_diagonal(stats.gram(layer.bias is not None))
    else:
        aqer, wqer = (0.1 * config.coe if stats.token_input else 0.1), 0.1 * config.coe
    return LayerPlan(aqer if config.aqer and aqer_helps else None, wqer if config.wqer else None,
                     output_aware_clipping=clipping), alpha


def calibrate_before(unit: nn.Module, module: nn.Module, unit_input: Tensor) -> None:
    """Re-search, on the partly quantized model, the ranges of the quantizers `module` uses."""
    if isinstance(module, QuantMatMul):
        a, b = call_arguments(unit, unit_input[:MATMUL_SEARCH_IMAGES], module)
        search_range(module.a_quantizer, a, matmul_loss(a, b, 0))
        search_range(module.b_quantizer, b, matmul_loss(module.a_quantizer.quantize(a), b, 1))
    elif isinstance(module, QuantLinear):
        seen = call_arguments(unit, unit_input, module)[0]
        search_range(module.input_quantizer, seen, linear_input_loss(seen, module.weight))


def quantize_plus(model: nn.Module, calibration: Iterable, config: QuantRecipe, seconds: dict[str, float],
                  progress: Callable[[str, int, int], None], options: PlusOptions = PlusOptions()) -> list[dict]:
    """Quantize `model` (converted, reparameterized, activation quantizers calibrated) in place."""
    device = next(model.parameters()).device
    batches = [(batch[0] if isinstance(batch, (list, tuple)) else batch).to(device) for batch in calibration]
    fp_model = copy.deepcopy(model)
    set_quant_state(fp_model, activations=False, weights=False)
    set_quant_state(model, activations=True, weights=False)

    def solve(name: str, layer: nn.Module, stats: LayerStats, folds: Optional[FoldedStats]) -> dict:
        with timed(seconds, "choose_lambda"):
            plan, alpha = layer_plan(layer, stats, folds, config, options)
        report = solve_layer(name, layer, stats, plan, seconds)
        if alpha is not None:
            report["alpha"] = alpha
        if isinstance(layer, QuantLinear) and config.aqer:
            report["aqer_kept"] = plan.aqer_lambda is not None
        return report

    after_block = None
    if config.reconstruct:
        from erq_core.reconstruct import reconstruct_block

        def after_block(name: str, block: nn.Module, inputs: list[Tensor], targets: list[Tensor]) -> None:
            images = config.reconstruct_images
            with timed(seconds, "reconstruct"):
                before, after = reconstruct_block(
                    block, leading_images(inputs, images), leading_images(targets, images), config.reconstruct_iters,
                    seed=config.seed, progress=lambda done, total: progress(RECONSTRUCT_STAGE, done, total))
            log.info("reconstructed %s: block output error %.4g -> %.4g", name, before, after)

    def timed_calibration(unit: nn.Module, module: nn.Module, unit_input: Tensor) -> None:
        with timed(seconds, "calibrate_activations"):
            calibrate_before(unit, module, unit_input)

    start, attributed = time.perf_counter(), sum(seconds.values())
    reports = quantize_sequentially(
        model, fp_model, batches, config.calib_size, solve,
        calibrate_quantizers=timed_calibration if options.output_aware_activations else None,
        after_block=after_block, progress=lambda done, total: progress(LAYERS_STAGE, done, total))
    # what the walk spent outside the stages timed above: the forwards and the statistics
    inside = sum(seconds.values()) - attributed
    seconds["collect_statistics"] = round(time.perf_counter() - start - inside, 3)
    return reports
