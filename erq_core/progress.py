"""Progress reporting: the engine calls progress(stage, done, total). Its stages, in order, with the
share of a whole run each stands for (the worker's 0..1 progress: `run_fraction`), and tqdm bars for
the command line.

The engine's callers stop a run from their progress callback (the worker raises there on cancel,
shutdown or time limit), so every long loop of the engine calls it at least every few seconds.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

# erq+ walks the blocks once (LAYERS_STAGE, `done` counting layers); with --reconstruct, each block's
# reconstruction steps are RECONSTRUCT_STAGE, reported between its layers and the next block's.
LAYERS_STAGE, RECONSTRUCT_STAGE = "quantize_layers", "reconstruct"


@dataclass(frozen=True)
class Stage:
    name: str
    weight: float  # its share of a whole run's progress


# What a run reports, in order (evaluate_fp and evaluate only with evaluation, the last two only with
# the exports that need them).
# budget_search (--max-drop: the 8-bit pass, the sensitivities, the held-out evaluations) is at least
# as long as everything before it; a run without it skips its share when evaluation starts.
STAGES = (Stage("load_model", 0.05), Stage("evaluate_fp", 0.1), Stage("calibrate_activations", 0.05),
          Stage("collect_statistics", 0.15), Stage("aqer", 0.05), Stage("calibrate_weights", 0.05), Stage("wqer", 0.15),
          Stage("budget_search", 0.2), Stage("evaluate", 0.15), Stage("save", 0.05), Stage("evaluate_float64", 0.0),
          Stage("export", 0.0), Stage("evaluate_onnx", 0.0))
STAGE_WEIGHTS = {stage.name: stage.weight for stage in STAGES}
# erq+ walks the blocks once (LAYERS_STAGE) instead of erq's four layer stages: it stands for all four.
LAYER_STAGES = ("collect_statistics", "aqer", "calibrate_weights", "wqer")
# erq solves layer by layer, reporting these three in turn for each layer: they share one span of the
# run, or the fraction would fall back at every layer (after wqer of layer i comes aqer of layer i+1).
INTERLEAVED_STAGES = ("aqer", "calibrate_weights", "wqer")


def run_fraction(stage: str, done: int, total: int) -> float:
    """The fraction of a whole run done once `done` of `total` steps of `stage` are. RECONSTRUCT_STAGE
    has no share of its own (its steps are within a block of LAYERS_STAGE): callers keep the
    fraction reached before it."""
    share = done / total if total else 0.0
    before = 0.0
    for declared in STAGES:
        if stage == LAYERS_STAGE and declared.name == LAYER_STAGES[0]:
            return min(1.0, before + sum(STAGE_WEIGHTS[name] for name in LAYER_STAGES) * share)
        if stage in INTERLEAVED_STAGES and declared.name == INTERLEAVED_STAGES[0]:
            return min(1.0, before + sum(STAGE_WEIGHTS[name] for name in INTERLEAVED_STAGES) * share)
        if declared.name == stage:
            return min(1.0, before + declared.weight * share)
        before += declared.weight
    return before


class TqdmProgress:
    """One tqdm bar per stage, on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: Optional[bool] = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._stage: Optional[str] = None
        self._bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=total or None, desc=stage, unit="step", leave=True, dynamic_ncols=True)
        if total and self._bar.total != total:
            self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
