"""Shared test fixtures: the bundled Fashion-MNIST ViT and dataset (tests/fixtures/)."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import pytest

# The tests' tensors are small, and on a shared two-core machine OpenMP's thread barriers cost far
# more than they save: under load a tiny Swin ERQ run took 46 s with two threads and 1.6 s with
# one. Set before anything imports torch; an OMP_NUM_THREADS from the environment still wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Hypothesis (under schemathesis) keeps its example database outside the checkout: tests write nothing there.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "erq-tests-hypothesis"))

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


# The two lanes (`make test-fast` runs `unit` alone; `make test` runs both). A test is `integration`
# when it is marked so (it starts real processes, a browser, a compose check) or when it needs
# PostgreSQL, Redis or an S3 server; every other test is `unit`: pure computation, or the API in
# process on SQLite.
SERVER_FIXTURES = {"postgres_server", "postgres_url", "redis_server", "redis_broker", "s3_server", "s3_bucket"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("integration") or item.get_closest_marker("unit"):
            continue
        on_postgresql = getattr(item, "callspec", None) and item.callspec.params.get("database_url") == "postgresql"
        needs_server = SERVER_FIXTURES & set(item.fixturenames) or on_postgresql
        item.add_marker(pytest.mark.integration if needs_server else pytest.mark.unit)

