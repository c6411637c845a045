"""GET /v1/jobs/{id}/artifacts.tar: the whole result folder in one streamed download."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from storage.artifacts.folder import FolderStore
from storage.models import JobStatus
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import ON_SQLITE, end_job_with_files, make_key, worker_and_api
from tests.service.processes import wait_for_job

JOB = {"model": f"local-dir:{FIXTURE_MODEL_DIR}", "dataset": str(FIXTURE_DATASET), "val_limit": 50}


@pytest.fixture
def alice(settings) -> dict:
    return {"Authorization": f"Bearer {make_key(settings, 'alice')}"}


def _finish(client, alice, settings, contents: dict[str, bytes], status=JobStatus.SUCCEEDED) -> str:
    job_id = client.post("/v1/jobs", json=JOB, headers=alice).json()["id"]
    end_job_with_files(settings, job_id, contents, status, None if status == JobStatus.SUCCEEDED else "x")
    return job_id


@ON_SQLITE
def test_the_tar_holds_the_result_folder_byte_for_byte(settings, alice):
    contents = {"quantized.safetensors": os.urandom(3 * 1024 * 1024 + 7), "config.json": b'{"w_bits": 4}',
                "metrics.json": b"{}", "job.log": b"log\n"}
    with TestClient(create_app(settings)) as client:
        job_id = _finish(client, alice, settings, contents)
        with client.stream("GET", f"/v1/jobs/{job_id}/artifacts.tar", headers=alice) as answer:
            assert answer.status_code == 200 and answer.headers["content-type"] == "application/x-tar"
            body = b"".join(answer.iter_bytes())
        assert int(answer.headers["content-length"]) == len(body)
        assert f'filename="erq-{job_id}.tar"' in answer.headers["content-disposition"]
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            assert tar.getnames() == ["quantized.safetensors", "config.json", "metrics.json"]
            for name in tar.getnames():
                assert tar.extractfile(name).read() == contents[name]
        again = client.get(f"/v1/jobs/{job_id}/artifacts.tar", headers={**alice, "If-None-Match": answer.headers["ETag"]})
        assert again.status_code == 304


@ON_SQLITE
def test_no_tar_without_a_result(settings, alice):
    with TestClient(create_app(settings)) as client:
        failed = _finish(client, alice, settings, {"job.log": b"x"}, JobStatus.FAILED)
        answer = client.get(f"/v1/jobs/{failed}/artifacts.tar", headers=alice)
        assert answer.status_code == 409 and answer.json()["code"] == "no_result"
        done = _finish(client, alice, settings, {"quantized.safetensors": b"q", "config.json": b"{}",
                                                 "metrics.json": b"{}"})
        (FolderStore(settings.artifact_dir).run_dir(done, "attempt-1") / "config.json").unlink()
        answer = client.get(f"/v1/jobs/{done}/artifacts.tar", headers=alice)
        assert answer.status_code == 410 and answer.json()["code"] == "artifact_missing"
        assert client.get("/v1/jobs/nope/artifacts.tar", headers=alice).json()["code"] == "job_not_found"


@ON_SQLITE
@pytest.mark.integration
def test_a_real_jobs_tar_loads_as_a_quantized_model(tmp_path, settings):
    import erq_core

    with worker_and_api(tmp_path, settings) as client:
        job_id = client.post("/v1/jobs", json=JOB).json()["id"]
        job = wait_for_job(client, job_id, ("succeeded", "failed"), 240)
        assert job["status"] == "succeeded", job
        with client.stream("GET", f"/v1/jobs/{job_id}/artifacts.tar") as answer:
            assert answer.status_code == 200
            body = b"".join(answer.iter_bytes())
    folder = tmp_path / "result"
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        tar.extractall(folder, filter="data")
    sums = {a["name"]: a["sha256"] for a in job["artifacts"]}
    for name in ("quantized.safetensors", "config.json", "metrics.json"):
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == sums[name]
    result = erq_core.evaluate_quantized(folder, FIXTURE_DATASET, val_limit=50, device="cpu")
    assert result["top1"] == job["metrics"]["quantized"]["top1"]
