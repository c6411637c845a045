"""Shared test fixtures: the bundled Fashion-MNIST ViT and dataset (tests/fixtures/)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL, FIXTURE_VAL_LIMIT


@pytest.fixture(scope="session")
def fixture_model_spec() -> str:
    return FIXTURE_MODEL


@pytest.fixture(scope="session")
def fixture_dataset() -> Path:
    return FIXTURE_DATASET


@pytest.fixture(scope="session")
def erq_w4a4_run(tmp_path_factory) -> tuple[Path, dict]:
    """ERQ W4/A4 on the fixture, run once per session: (output folder, metrics)."""
    from erq_core import ErqConfig, run

    out = tmp_path_factory.mktemp("erq_w4a4")
    config = ErqConfig(model=FIXTURE_MODEL, dataset=str(FIXTURE_DATASET), w_bits=4, a_bits=4,
                       calib_size=32, val_limit=FIXTURE_VAL_LIMIT)
    metrics = run(config, out, device="cpu")
    assert json.loads((out / "metrics.json").read_text()) == metrics
    return out, metrics


@pytest.fixture(autouse=True)
def _quiet_engine_log():
    logging.getLogger("erq").setLevel(logging.WARNING)
    yield
