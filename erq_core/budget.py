"""An accuracy budget (`--max-drop X`): the fewest layers at 8 bits that keep top-1 within X points
of FP on labelled images held out from the calibration draw.

1. The model is quantized twice with the run's method: at the run's bit widths (the low model) and
   at W8/A8 (the high model). A layer (erq_core/precision.py: a linear layer with its input, the
   patch embedding, an attention matmul) at 8 bits takes the high model's module (and, for a
   linear layer after a folded LayerNorm, that LayerNorm: the fold depends on the bits).
2. Sensitivity of a layer: how much the logits on the first calibration images move away from
   FP's when that layer alone takes its low-bit module in the otherwise 8-bit model (squared error,
   summed over images and classes). Layers go to 8 bits in decreasing sensitivity.
3. The count k of 8-bit layers: the smallest k whose model is within X points of FP on the
   held-out images (train/ images after the calibration draw, never val/), trying k = 0, 1, 2, ...
   in turn. Held-out top-1 does not grow monotonically with k (a few images flip either way), so
   a bisection would miss counts that pass. A candidate's evaluation stops as soon as it has more
   wrong images than the budget allows. Cost: two quantizations (the run's bits and W8/A8), one
   forward of the sensitivity images per layer, and k + 2 evaluations of the held-out images, the
   failing ones cut short.

The delivered model is the one the search measured: the low model with the k layers from the
high model, so the held-out figure in metrics.json is that model's own.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from erq_core.config import QuantRecipe
from erq_core.errors import DatasetError
from erq_core.pipeline import Progress, QuantizedModel, first_images, quantize
from erq_core.precision import precision_layers

log = logging.getLogger("erq")
HIGH_BITS = 8
HELDOUT_IMAGES = 500  # at most; 500 images resolve about 2 points (one std) of top-1
SENSITIVITY_IMAGES = 16
BUDGET_STAGE = "budget_search"


def heldout_samples(root: str | Path, calibration_images: int, seed: int,
                    limit: int = HELDOUT_IMAGES) -> list[tuple[str, int]]:
    """Up to `limit` train/ images that the calibration draw of `calibration_images` with `seed`
    does not take: the next ones of the same seeded permutation (erq_core.data.calibration_loader)."""
    from erq_core.data import list_split

    _, samples = list_split(root, "train")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    rest = order[calibration_images:calibration_images + limit]
    if not rest:
        raise DatasetError(f"max_drop needs labelled train/ images beyond the {calibration_images} of the "
                           f"calibration draw, and {Path(root) / 'train'} has only {len(samples)}: add images "
                           "or lower calib_size")
    return [samples[i] for i in rest]


def heldout_batches(root: str | Path, transform: Callable, calibration_images: int, seed: int,
                    batch_size: int, limit: int = HELDOUT_IMAGES) -> list[tuple[Tensor, Tensor]]:
    """The held-out images and labels, decoded once (the search evaluates them several times)."""
    from torch.utils.data import DataLoader

    from erq_core.data import ImageFiles

    dataset = ImageFiles(heldout_samples(root, calibration_images, seed, limit), transform)
    return [(images, labels) for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False)]


@dataclass
class Swap:
    """The modules that make one layer: the layer and, after a folded LayerNorm, that LayerNorm."""

    names: tuple[str, ...]


def layer_swaps(model: nn.Module, norm_linear_pairs: dict[str, str]) -> dict[str, Swap]:
    return {name: Swap((name, norm_linear_pairs[name]) if name in norm_linear_pairs else (name,))
            for name, _ in precision_layers(model)}


def _replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def mixed(base: nn.Module, donor: nn.Module, layers: Iterable[str], swaps: dict[str, Swap]) -> nn.Module:
    """A copy of `base` whose `layers` are copies of `donor`'s."""
    model = copy.deepcopy(base)
    for layer in layers:
        for name in swaps[layer].names:
            _replace(model, name, copy.deepcopy(donor.get_submodule(name)))
    return model


@torch.no_grad()
def sensitivities(low: nn.Module, high: nn.Module, fp: nn.Module, images: Tensor,
                  swaps: dict[str, Swap]) -> dict[str, float]:
    """Per layer: the logits' squared error to FP when that layer alone is at low bits in the high
    model, minus the high model's own (how much that layer's low precision costs)."""
    reference = fp(images)
    base = float((high(images) - reference).pow(2).sum())
    result = {}
    for layer, swap in swaps.items():
        originals = [_replace(high, name, low.get_submodule(name)) for name in swap.names]
        try:
            result[layer] = float((high(images) - reference).pow(2).sum()) - base
        finally:
            for name, original in zip(swap.names, originals):
                _replace(high, name, original)
    return result


def fewest_passing(passes: Callable[[int], bool], count: int) -> Optional[int]:
    """The smallest k in 0..count with passes(k), trying every k in turn (held-out accuracy does not
    grow monotonically with k: a bisection would miss counts that pass)."""
    return next((k for k in range(count + 1) if passes(k)), None)


@torch.no_grad()
def heldout_score(model: nn.Module, batches: list[tuple[Tensor, Tensor]], device: torch.device,
                  allowed_wrong: Optional[int] = None) -> tuple[int, int]:
    """(wrong, seen) on the held-out images; stops as soon as more than `allowed_wrong` are wrong
    (the model cannot meet the budget any more), which saves most of a failing model's forwards."""
    model.eval()
    wrong = seen = 0
    for images, labels in batches:
        wrong += int((model(images.to(device)).argmax(dim=-1).cpu() != labels).sum())
        seen += len(labels)
        if allowed_wrong is not None and wrong > allowed_wrong:
            break
    return wrong, seen


@torch.no_grad()
def quantize_with_budget(model: nn.Module, calibration: Iterable, heldout: list[tuple[Tensor, Tensor]],
                         config: QuantRecipe, progress: Optional[Progress] = None) -> QuantizedModel:
    """Quantize `model` (in place: it becomes the low model) with the fewest 8-bit layers that keep
    held-out top-1 within config.max_drop of FP."""
    progress = progress or (lambda stage, done, total: None)
    device = next(model.parameters()).device
    start = time.perf_counter()
    fp = copy.deepcopy(model).eval()
    images = sum(len(labels) for _, labels in heldout)
    fp_wrong, _ = heldout_score(fp, heldout, device)
    # top-1 within max_drop of FP's: at most this many held-out images wrong
    allowed_wrong = math.floor(fp_wrong + config.max_drop * images / 100 + 1e-9)
    high_model = copy.deepcopy(model)
    low = quantize(model, calibration, config, progress)
    # the 8-bit pass reports as the budget's stage: its own stages again would move the run's progress back
    high = quantize(high_model, calibration, dataclasses.replace(config, w_bits=HIGH_BITS, a_bits=HIGH_BITS),
                    lambda stage, done, total: progress(BUDGET_STAGE, 0, 1))
    swaps = layer_swaps(low.model, low.norm_linear_pairs)
    count = len(swaps)
    ranking: list[str] = []
    measured: dict[int, dict] = {}

    def passes(k: int) -> bool:
        if k in measured:
            return measured[k]["passed"]
        candidate = low.model if k == 0 else high.model if k == count else mixed(low.model, high.model,
                                                                               ranking[:k], swaps)
        wrong, seen = heldout_score(candidate, heldout, device, allowed_wrong)
        measured[k] = {"top1": round(100.0 * (seen - wrong) / seen, 4) if seen == images else None,
                       "images_seen": seen, "passed": wrong <= allowed_wrong}
        progress(BUDGET_STAGE, k, count)
        log.info("budget: %d of %d layers at 8 bits -> %d of %d held-out images wrong (at most %d allowed)",
                 k, count, wrong, seen, allowed_wrong)
        return wrong <= allowed_wrong

    met = passes(count)
    if met:
        scores = sensitivities(low.model, high.model, fp, first_images(calibration, SENSITIVITY_IMAGES, device),
                               swaps)
        ranking = sorted(scores, key=lambda name: -scores[name])
        k = fewest_passing(passes, count)
    else:
        log.warning("budget: even with every layer at 8 bits more than %d held-out images are wrong", allowed_wrong)
        ranking, k = list(swaps), count
    chosen = ranking[:k]
    for layer in chosen:  # the delivered model is the one measured
        for name in swaps[layer].names:
            _replace(low.model, name, high.model.get_submodule(name))
    high_reports = {report["name"]: report for report in high.layers}
    layers = [high_reports[r["name"]] if r["name"] in chosen else r for r in low.layers]
    high_seconds = sum(high.seconds.values())
    seconds = {**low.seconds, "quantize_high": round(high_seconds, 3),  # the sensitivities and evaluations:
               "budget_search": round(time.perf_counter() - start - high_seconds - sum(low.seconds.values()), 3)}
    fp_top1 = round(100.0 * (images - fp_wrong) / images, 4)
    top1 = measured[k]["top1"]
    budget = {"max_drop": config.max_drop, "met": met,
              "heldout_images": images, "fp_top1_heldout": fp_top1, "top1_heldout": top1,
              "drop_heldout": None if top1 is None else round(fp_top1 - top1, 4),
              "layers_at_8_bits": k, "layers": count, "chosen": chosen, "ranking": ranking,
              "evaluations": {str(n): v for n, v in sorted(measured.items())},
              "sensitivity": "squared error of the logits to FP's on the first calibration images when the layer "
                             "alone is at low bits in the W8/A8 model, minus the W8/A8 model's own"}
    return dataclasses.replace(low, layers=layers, seconds=seconds, budget=budget)
