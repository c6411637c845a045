"""DELETE /v1/jobs/{id} and ERQ_ARTIFACT_TTL_DAYS, on SQLite and PostgreSQL, through a real HTTP client."""
from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from storage import jobs
from storage.artifacts.folder import FolderStore
from storage.db import session_scope
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import ON_SQLITE, end_job_with_files, make_key, service_env
from tests.service.processes import api_client, api_process, erq_process

JOB = {"model": f"local-dir:{FIXTURE_MODEL_DIR}", "dataset": str(FIXTURE_DATASET), "val_limit": 50}


@pytest.fixture
def alice(settings) -> dict:
    return {"Authorization": f"Bearer {make_key(settings, 'alice')}"}


def finished_job(client, headers, settings) -> dict:
    """A job submitted through the API and ended by the job-state code the worker uses, with files."""
    job_id = client.post("/v1/jobs", json=JOB, headers=headers).json()["id"]
    end_job_with_files(settings, job_id, {name: name.encode() for name in
                                          ("config.json", "metrics.json", "quantized.safetensors", "job.log")})
    return client.get(f"/v1/jobs/{job_id}", headers=headers).json()


def test_deleting_an_ended_job_removes_its_files_and_then_it_is_gone(settings, alice):
    with TestClient(create_app(settings)) as client:
        job = finished_job(client, alice, settings)
        folder = FolderStore(settings.artifact_dir).job_dir(job["id"])
        assert folder.is_dir()
        bob = {"Authorization": f"Bearer {make_key(settings, 'bob')}"}
        assert client.delete(f"/v1/jobs/{job['id']}", headers=bob).status_code == 404  # not bob's
        answer = client.delete(f"/v1/jobs/{job['id']}", headers=alice)
        assert answer.status_code == 204 and answer.content == b""
        assert not folder.exists()
        for method, path in (("GET", ""), ("GET", "/log"), ("GET", "/artifacts/config.json"), ("DELETE", "")):
            gone = client.request(method, f"/v1/jobs/{job['id']}{path}", headers=alice)
            assert gone.status_code == 404 and gone.json()["code"] == "job_not_found", (method, path)
        assert client.get("/v1/jobs", headers=alice).json()["jobs"] == []


def test_an_active_job_must_be_cancelled_before_it_is_deleted(settings, alice):
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/v1/jobs", json=JOB, headers=alice).json()["id"]
        with session_scope(settings.database_url) as session:
            jobs.claim(session, job_id, "w1")
        refused = client.delete(f"/v1/jobs/{job_id}", headers=alice)
        assert refused.status_code == 409 and refused.json()["code"] == "job_active"
        assert f"POST /v1/jobs/{job_id}/cancel" in refused.json()["detail"]
        queued = client.post("/v1/jobs", json=JOB, headers=alice).json()["id"]
        assert client.delete(f"/v1/jobs/{queued}", headers=alice).status_code == 409
        client.post(f"/v1/jobs/{queued}/cancel", headers=alice)
        assert client.delete(f"/v1/jobs/{queued}", headers=alice).status_code == 204


def test_artifacts_past_the_retention_are_removed_and_answer_410(settings, alice):
    from storage.queue import make_celery
    from worker.sweeper import Sweeper, standard_duties

    settings = settings.model_copy(update={"artifact_ttl_days": 2 / 86400})  # two seconds
    with TestClient(create_app(settings)) as client:
        old = finished_job(client, alice, settings)
        time.sleep(2.5)
        recent = finished_job(client, alice, settings)
        assert Sweeper(standard_duties(make_celery(settings), settings)).run_due()
        store = FolderStore(settings.artifact_dir)
        assert not store.job_dir(old["id"]).exists() and store.job_dir(recent["id"]).is_dir()
        listed = {j["id"]: j for j in client.get("/v1/jobs", headers=alice).json()["jobs"]}
        assert listed[old["id"]]["artifacts_expired_at"] is not None and listed[old["id"]]["status"] == "succeeded"
        assert listed[recent["id"]]["artifacts_expired_at"] is None
        for url in [a["url"] for a in old["artifacts"]] + [f"/v1/jobs/{old['id']}/log"]:
            answer = client.get(url, headers=alice)
            assert answer.status_code == 410 and answer.json()["code"] == "artifacts_expired", url
        assert client.head(old["artifacts"][0]["url"], headers=alice).status_code == 410
        assert client.get(recent["artifacts"][0]["url"], headers=alice).status_code == 200
        assert client.delete(f"/v1/jobs/{old['id']}", headers=alice).status_code == 204  # an expired job deletes


def test_without_a_retention_nothing_expires(settings, alice):
    from worker.sweeper import expire_artifacts, standard_duties

    assert all(duty.name != "artifact retention" for duty in standard_duties(None, settings))
    with TestClient(create_app(settings)) as client:
        job = finished_job(client, alice, settings)
    assert expire_artifacts(settings.model_copy(update={"artifact_ttl_days": 1})) == []
    assert FolderStore(settings.artifact_dir).job_dir(job["id"]).is_dir()


@ON_SQLITE
@pytest.mark.integration
def test_a_real_worker_sweeps_expired_artifacts(tmp_path, settings, monkeypatch):
    """`erq worker`'s sweeper runs the retention duty (every 60 s; the first round at start)."""
    key = make_key(settings, "alice")
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings)) as client:
        job = finished_job(client, headers, settings)
    time.sleep(1.5)
    env = service_env(tmp_path, ERQ_DATABASE_URL=settings.database_url, ERQ_BROKER_URL=settings.broker_url,
                      ERQ_ARTIFACT_TTL_DAYS=str(1 / 86400))
    with erq_process(["worker"], env, tmp_path, tmp_path / "worker.log"), \
            api_process(["api"], env, tmp_path, tmp_path / "api.log") as (api, port):
        with api_client(port, key) as client:
            deadline = time.monotonic() + 120
            while client.get(f"/v1/jobs/{job['id']}").json()["artifacts_expired_at"] is None:
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
                time.sleep(0.5)
            assert client.get(httpx.URL(job["artifacts"][0]["url"]).path).status_code == 410
    assert not FolderStore(settings.artifact_dir).job_dir(job["id"]).exists()
