"""An accuracy budget (`--max-drop X`): few layers at 8 bits (a count that keeps top-1 within X points
of FP on labelled images held out from the calibration draw while one layer fewer does not).

1. The model is quantized twice with the run's method: at the run's bit widths (the low model) and
   at W8/A8 (the high model). A layer (erq_core/precision.py: a linear layer with its input, the
   patch embedding, an attention matmul) at 8 bits takes the high model's module (and, for a
   linear layer after a folded LayerNorm, that LayerNorm: the fold depends on the bits).
2. Sensitivity of a layer: how much the logits on the first calibration images move away from
   FP's when that layer alone takes its low-bit module in the otherwise 8-bit model (squared error,
   summed over images and classes). Layers go to 8 bits in decreasing sensitivity.
3. The count k of 8-bit layers: one whose model is within X points of FP on the held-out images
   (every train/ image outside the calibration draw, up to HELDOUT_IMAGES, never val/) and whose
   predecessor is not. A count is judged paired against FP on the same images: lost (FP right,
   quantized wrong) minus gained images, plus a margin of MARGIN_STDERRS standard errors of that
   difference (sqrt(lost + gained)), must be within X% of the images; without the margin the
   first count to pass by luck was delivered. Counts 0, 1, 2, 4, ... are tried until one passes,
   then the gap to the last that failed is bisected. A candidate's evaluation stops as soon as it
   cannot pass any more. Cost: two quantizations (the run's bits and W8/A8), one forward of the
   sensitivity images per layer, and about 2 log2(k) + 3 evaluations of the held-out images.

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
from erq_core.pipeline import (ACTIVATION_CALIBRATION_IMAGES, Progress, QuantizedModel, balance, first_images,
                               quantize, wants_balance)
from erq_core.precision import precision_layers
from erq_core.progress import RECONSTRUCT_STAGE, run_fraction

log = logging.getLogger("erq")
HIGH_BITS = 8
HELDOUT_IMAGES = 1000  # at most: every train/ image outside the draw on a small set, a bounded memory on a big one
# a count passes when its held-out drop plus this many standard errors of the paired drop is within
# the budget: the first count that passes by luck would otherwise be the one delivered
MARGIN_STDERRS = 1.0
SENSITIVITY_IMAGES = 16
BUDGET_STAGE = "budget_search"


class BudgetProgress:
    """The budget's work as one BUDGET_STAGE that only moves forward: the 8-bit pass (its stages
    mapped as they count in a run: calibration through the layer solves), then the layer
    sensitivities, then the held-out evaluations, in PHASES shares. The bisection's counts go up
    and down; the number of evaluations done, against its bound, does not."""

    PHASES = {"high": (0.0, 0.45), "sensitivity": (0.45, 0.6), "search": (0.6, 1.0)}
    STEPS = 1000

    def __init__(self, progress: Progress):
        self.progress = progress
        self.reached = 0.0

    def report(self, phase: str, done: int, total: int) -> None:
        start, end = self.PHASES[phase]
        fraction = start + (end - start) * (min(done, total) / total if total else 0.0)
        self.reached = max(self.reached, fraction)
        self.progress(BUDGET_STAGE, round(self.STEPS * self.reached), self.STEPS)

    def high_pass(self, stage: str, done: int, total: int) -> None:
        """A callback for the 8-bit pass: its own stages would move the run's progress back."""
        if stage == RECONSTRUCT_STAGE:  # within a block of the layer walk: the fraction reached stands
            self.report("high", 0, 1)
            return
        first, last = run_fraction("calibrate_activations", 0, 1), run_fraction("wqer", 1, 1)
        self.report("high", round(self.STEPS * (run_fraction(stage, done, total) - first)),
                    round(self.STEPS * (last - first)))


def evaluations_bound(count: int) -> int:
    """The most held-out evaluations search() makes for `count` layers: all at 8 bits, then
    fewest_passing's doubling (0, 1, 2, 4, ..., count: at most 2 + ceil(log2 count)) and bisection."""
    if count == 0:
        return 2  # all at 8 bits, then 0
    steps = math.ceil(math.log2(count)) if count > 1 else 0
    return 3 + 2 * steps


def heldout_samples(root: str | Path, calibration_images: int, seed: int,
                    limit: int = HELDOUT_IMAGES) -> list[tuple[str, int]]:
    """Every train/ image (up to `limit`) that the calibration draw of `calibration_images` with `seed`
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
                  swaps: dict[str, Swap], progress: Optional[Progress] = None) -> dict[str, float]:
    """Per layer: the logits' squared error to FP when that layer alone is at low bits in the high
    model, minus the high model's own (how much that layer's low precision costs).
    `progress(done, total)` after each layer."""
    reference = fp(images)
    base = float((high(images) - reference).pow(2).sum())
    result = {}
    for done, (layer, swap) in enumerate(swaps.items(), start=1):
        if progress is not None:
            progress(done, len(swaps))
        originals = [_replace(high, name, low.get_submodule(name)) for name in swap.names]
        try:
            result[layer] = float((high(images) - reference).pow(2).sum()) - base
        finally:
            for name, original in zip(swap.names, originals):
                _replace(high, name, original)
    return result


def fewest_passing(passes: Callable[[int], bool], count: int) -> Optional[int]:
    """A count k in 0..count that passes while k - 1 fails (0 if 0 passes; None if none passes):
    0, 1, 2, 4, 8, ... until one passes, then a bisection between the last that failed and it.

    Held-out top-1 is not monotone in k (a few images flip either way), so a smaller count may pass
    as well; with the margin (MARGIN_STDERRS) such a count is within a standard error of the one
    found, and the search costs about 2 log2(k) evaluations instead of k + 1."""
    failed, k = -1, 0
    while not passes(k):
        if k == count:
            return None
        failed, k = k, min(max(2 * k, 1), count)
    while k - failed > 1:
        middle = (failed + k) // 2
        if passes(middle):
            k = middle
        else:
            failed = middle
    return k


@dataclass
class PairedCount:
    """Held-out images on which FP and a quantized model disagree about being right.

    `lost`: FP right, quantized wrong; `gained`: the reverse. The drop in top-1 is
    (lost - gained) / images; the images both get right or both get wrong cancel, so its noise
    (sqrt(lost + gained) images, McNemar's) is far below that of two independent accuracies."""

    lost: int = 0
    gained: int = 0

    def add(self, fp_right: Tensor, right: Tensor) -> None:
        self.lost += int((fp_right & ~right).sum())
        self.gained += int((~fp_right & right).sum())

    def judged(self, gained_more: int = 0) -> float:
        """The drop in images plus MARGIN_STDERRS standard errors, as if `gained_more` more images
        were gained (the most that the images not seen yet can still give back)."""
        gained = self.gained + gained_more
        return self.lost - gained + MARGIN_STDERRS * math.sqrt(self.lost + gained)


def allowed_images(max_drop: float, images: int) -> float:
    """A budget of max_drop points of top-1 on `images` held-out images, in images."""
    return max_drop * images / 100 + 1e-9


@torch.no_grad()
def fp_right(fp: nn.Module, batches: list[tuple[Tensor, Tensor]], device: torch.device) -> list[Tensor]:
    """Per batch, which held-out images FP gets right."""
    fp.eval()
    return [fp(images.to(device)).argmax(dim=-1).cpu() == labels for images, labels in batches]


@torch.no_grad()
def heldout_count(model: nn.Module, batches: list[tuple[Tensor, Tensor]], fp_rights: list[Tensor],
                  device: torch.device, allowed: Optional[float] = None) -> tuple[PairedCount, int]:
    """(the paired count against FP, images seen); stops as soon as the model cannot meet `allowed`
    any more (even if it got right every remaining image that FP gets wrong), which saves most of a
    failing model's forwards. The judged drop cannot rise when a gained image is added (its margin
    grows by at most one image), so the bound is exact."""
    model.eval()
    count, seen = PairedCount(), 0
    fp_wrong_left = sum(int((~right).sum()) for right in fp_rights)
    for (images, labels), fp_rights_here in zip(batches, fp_rights):
        count.add(fp_rights_here, model(images.to(device)).argmax(dim=-1).cpu() == labels)
        seen += len(labels)
        fp_wrong_left -= int((~fp_rights_here).sum())
        if allowed is not None and count.judged(fp_wrong_left) > allowed:
            break
    return count, seen


@dataclass
class Search:
    """What the budget search found: the count of 8-bit layers, the ranking and every evaluation."""

    k: int
    met: bool
    ranking: list[str]
    measured: dict[int, dict]
    fp_top1: float
    images: int


@torch.no_grad()
def search(fp: nn.Module, low: QuantizedModel, high: QuantizedModel, calibration: Iterable,
           heldout: list[tuple[Tensor, Tensor]], max_drop: float,
           progress: Optional[BudgetProgress] = None) -> Search:
    """The fewest layers of `low` to take from `high` for a held-out drop within `max_drop` points
    with a margin of MARGIN_STDERRS standard errors (the paired count's)."""
    progress = progress or BudgetProgress(lambda stage, done, total: None)
    device = next(fp.parameters()).device
    images = sum(len(labels) for _, labels in heldout)
    fp_rights = fp_right(fp, heldout, device)
    allowed = allowed_images(max_drop, images)
    swaps = layer_swaps(low.model, low.norm_linear_pairs)
    count = len(swaps)
    ranking: list[str] = []
    measured: dict[int, dict] = {}

    def passes(k: int) -> bool:
        if k in measured:
            return measured[k]["passed"]
        candidate = low.model if k == 0 else high.model if k == count else mixed(low.model, high.model,
                                                                               ranking[:k], swaps)
        paired, seen = heldout_count(candidate, heldout, fp_rights, device, allowed)
        complete = seen == images
        passed = complete and paired.judged() <= allowed
        measured[k] = {"drop": round(100.0 * (paired.lost - paired.gained) / images, 4) if complete else None,
                       "lost": paired.lost, "gained": paired.gained, "images_seen": seen, "passed": passed}
        progress.report("search", len(measured), evaluations_bound(count))
        log.info("budget: %d of %d layers at 8 bits -> %d lost, %d gained of %d held-out images (judged %.1f, at "
                 "most %.1f allowed)", k, count, paired.lost, paired.gained, seen, paired.judged(), allowed)
        return passed

    met = passes(count)
    if met:
        scores = sensitivities(low.model, high.model, fp, first_images(calibration, SENSITIVITY_IMAGES, device),
                               swaps, lambda done, total: progress.report("sensitivity", done, total))
        ranking = sorted(scores, key=lambda name: -scores[name])
        k = fewest_passing(passes, count)
    else:
        log.warning("budget: even with every layer at 8 bits the held-out drop is not within %s points", max_drop)
        ranking, k = list(swaps), count
    progress.report("search", 1, 1)
    fp_top1 = round(100.0 * sum(int(right.sum()) for right in fp_rights) / images, 4)
    return Search(k, met, ranking, measured, fp_top1, images)


@torch.no_grad()
def quantize_with_budget(model: nn.Module, calibration: Iterable, heldout: list[tuple[Tensor, Tensor]],
                         config: QuantRecipe, progress: Optional[Progress] = None) -> QuantizedModel:
    """Quantize `model` (in place: it becomes the low model) with the fewest 8-bit layers that keep
    held-out top-1 within config.max_drop of FP."""
    progress = progress or (lambda stage, done, total: None)
    start = time.perf_counter()
    # the low and the high model start from one balanced FP model, so that their layers can be swapped
    if wants_balance(model, config):
        balance(model, first_images(calibration, ACTIVATION_CALIBRATION_IMAGES, next(model.parameters()).device),
                config)
    fp = copy.deepcopy(model).eval()
    high_model = copy.deepcopy(model)
    low = quantize(model, calibration, config, progress)
    budget_progress = BudgetProgress(progress)
    high = quantize(high_model, calibration, dataclasses.replace(config, w_bits=HIGH_BITS, a_bits=HIGH_BITS),
                    budget_progress.high_pass)
    found = search(fp, low, high, calibration, heldout, config.max_drop, budget_progress)
    return with_budget(low, high, found, config.max_drop,
                       seconds_high=sum(high.seconds.values()), seconds_total=time.perf_counter() - start)


def with_budget(low: QuantizedModel, high: QuantizedModel, found: Search, max_drop: float,
                seconds_high: float, seconds_total: float) -> QuantizedModel:
    """`low` with the searched layers from `high` (the delivered model is the one measured) and
    the search's report."""
    swaps = layer_swaps(low.model, low.norm_linear_pairs)
    chosen = found.ranking[:found.k]
    for layer in chosen:
        for name in swaps[layer].names:
            _replace(low.model, name, high.model.get_submodule(name))
    high_reports = {report["name"]: report for report in high.layers}
    layers = [high_reports[r["name"]] if r["name"] in chosen else r for r in low.layers]
    seconds = {**low.seconds, "quantize_high": round(seconds_high, 3),  # the sensitivities and evaluations:
               "budget_search": round(seconds_total - seconds_high - sum(low.seconds.values()), 3)}
    drop = found.measured[found.k]["drop"]
    budget = {"max_drop": max_drop, "met": found.met, "margin_stderrs": MARGIN_STDERRS,
              "heldout_images": found.images, "fp_top1_heldout": found.fp_top1,
              "top1_heldout": None if drop is None else round(found.fp_top1 - drop, 4),
              "drop_heldout": drop, "layers_at_8_bits": found.k, "layers": len(swaps), "chosen": chosen,
              "ranking": found.ranking, "evaluations": {str(n): v for n, v in sorted(found.measured.items())},
              "sensitivity": "squared error of the logits to FP's on the first calibration images when the layer "
                             "alone is at low bits in the W8/A8 model, minus the W8/A8 model's own"}
    return dataclasses.replace(low, layers=layers, seconds=seconds, budget=budget)
