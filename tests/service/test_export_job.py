"""A job that asks for `"export": ["onnx", "onnx-float64"]`, end to end through `erq serve`:
model.onnx, model-float64.onnx and report.html are artifacts with their sha256, and onnxruntime
alone (no erq, no torch) gives the top-1 the job reported (the float64 model exactly its float64
top-1)."""
from __future__ import annotations

import hashlib
import signal

import httpx
import numpy as np
import pytest

from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import service_env
from tests.service.processes import serving, wait_for_job
from tests.test_onnx_export import run_onnxruntime_alone

pytestmark = pytest.mark.integration  # real erq processes

VAL_LIMIT = 200
JOB = {"model": f"local-dir:{FIXTURE_MODEL_DIR}", "dataset": str(FIXTURE_DATASET), "w_bits": 4, "a_bits": 4,
       "calib_size": 32, "val_limit": VAL_LIMIT, "export": ["onnx", "onnx-float64"]}


def validation_subset(pretrained_cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    from erq_core.data import build_transform, validation_loader

    batches = list(validation_loader(FIXTURE_DATASET, build_transform(pretrained_cfg), 100, VAL_LIMIT))
    return (np.concatenate([b[0].numpy() for b in batches]), np.concatenate([b[1].numpy() for b in batches]))


def download(client: httpx.Client, artifact: dict) -> httpx.Response:
    response = client.get(artifact["url"])
    assert response.status_code == 200, response.text
    assert hashlib.sha256(response.content).hexdigest() == artifact["sha256"] == response.headers["ETag"].strip('"')
    assert len(response.content) == artifact["size"]
    return response


def test_a_job_with_onnx_export_gives_a_model_onnxruntime_scores_as_the_job_did(tmp_path):
    with serving(tmp_path, service_env(tmp_path)) as (serve, client):
        refused = client.post("/v1/jobs", json={**JOB, "export": ["tflite"]})
        assert refused.status_code == 422 and "export" in refused.text and "onnx" in refused.text
        answer = client.post("/v1/jobs", json=JOB)
        assert answer.status_code == 202, answer.text
        job = wait_for_job(client, answer.json()["id"], ("succeeded", "failed", "cancelled"), 300)
        assert job["status"] == "succeeded", job
        assert job["params"]["export"] == ["onnx", "onnx-float64"]
        artifacts = {a["name"]: a for a in job["artifacts"]}
        assert {"model.onnx", "model-float64.onnx", "report.html", "quantized.safetensors",
                "metrics.json"} <= set(artifacts)
        for name in ("model.onnx", "model-float64.onnx"):
            (tmp_path / name).write_bytes(download(client, artifacts[name]).content)
        report = download(client, artifacts["report.html"])
        assert report.headers["content-type"].startswith("text/html")
        config = download(client, artifacts["config.json"]).json()
        serve.send_signal(signal.SIGINT)
        assert serve.wait(30) == 0
    images, labels = validation_subset(config["pretrained_cfg"])
    logits = run_onnxruntime_alone(tmp_path / "model.onnx", images, tmp_path)
    top1 = 100.0 * float((logits.argmax(1) == labels).mean())
    assert len(labels) == job["metrics"]["n_val"]
    assert abs(top1 - job["metrics"]["quantized"]["top1"]) <= 0.2, (top1, job["metrics"]["quantized"])
    (tmp_path / "float64").mkdir()
    logits = run_onnxruntime_alone(tmp_path / "model-float64.onnx", images, tmp_path / "float64")
    from erq_core.evaluate import percent  # the same image count, rounded as erq reports it

    assert percent(int((logits.argmax(1) == labels).sum()), len(labels)) == job["metrics"]["quantized_float64"]["top1"]
    assert f'data-value="{job["metrics"]["quantized"]["top1"]}"' in report.text
