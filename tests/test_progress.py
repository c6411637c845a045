"""The engine's stages and their shares of a run's progress (erq_core/progress.py), which the worker
reports as a job's 0..1 progress."""
from __future__ import annotations

import pytest

from erq_core.progress import INTERLEAVED_STAGES, LAYER_STAGES, LAYERS_STAGE, STAGE_WEIGHTS, STAGES, run_fraction

pytestmark = pytest.mark.unit


def test_the_stages_shares_add_up_to_a_whole_run():
    assert sum(stage.weight for stage in STAGES) == pytest.approx(1.0)
    assert list(STAGE_WEIGHTS) == [stage.name for stage in STAGES]


def test_a_stage_counts_from_the_end_of_the_stages_before_it():
    assert run_fraction("load_model", 0, 1) == 0.0
    assert run_fraction("evaluate_fp", 3, 4) == pytest.approx(0.05 + 0.1 * 3 / 4)
    assert run_fraction("collect_statistics", 1, 2) == pytest.approx(0.05 + 0.1 + 0.05 + 0.15 / 2)
    assert run_fraction("wqer", 1, 1) == pytest.approx(0.05 + 0.1 + 0.05 + 0.15 + 0.05 + 0.05 + 0.15)
    assert run_fraction("budget_search", 1, 2) == pytest.approx(run_fraction("wqer", 1, 1) + 0.2 / 2)
    assert run_fraction("save", 1, 1) == pytest.approx(1.0)


def test_erq_plus_one_walk_over_the_layers_stands_for_erqs_four_layer_stages():
    first, last = LAYER_STAGES[0], LAYER_STAGES[-1]
    assert run_fraction(LAYERS_STAGE, 0, 12) == pytest.approx(run_fraction(first, 0, 1))
    assert run_fraction(LAYERS_STAGE, 12, 12) == pytest.approx(run_fraction(last, 1, 1))
    assert run_fraction(LAYERS_STAGE, 6, 12) == pytest.approx((run_fraction(first, 0, 1) + run_fraction(last, 1, 1)) / 2)


def test_erqs_layer_stages_taken_in_turn_per_layer_never_move_progress_back():
    """erq reports aqer, calibrate_weights and wqer for layer 1, then for layer 2, ...: one shared span."""
    layers = 5
    calls = [(stage, i, layers) for i in range(1, layers + 1) for stage in INTERLEAVED_STAGES]
    fractions = [run_fraction(*call) for call in calls]
    assert fractions == sorted(fractions)
    start = run_fraction("collect_statistics", 1, 1)
    span = sum(STAGE_WEIGHTS[name] for name in INTERLEAVED_STAGES)
    assert fractions[-1] == pytest.approx(start + span) == pytest.approx(run_fraction("budget_search", 0, 1))
    assert fractions[0] == pytest.approx(start + span / layers)
