"""End to end with real processes: `erq serve` (embedded SQLite + broker), and `erq api` plus a
Celery worker on Redis and PostgreSQL. Submit the fixture job, download, load, compare."""
from __future__ import annotations

import hashlib
import http.client
import time

import httpx
import pytest

from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import run_erq, service_env
from tests.service.processes import api_process, erq_process, serving

pytestmark = pytest.mark.integration  # real erq processes

VAL_LIMIT = 200
FIXTURE_JOB = {"model": f"local-dir:{FIXTURE_MODEL_DIR}", "dataset": str(FIXTURE_DATASET), "w_bits": 4,
               "a_bits": 4, "calib_size": 32, "val_limit": VAL_LIMIT}


def check_fixture_job(client: httpx.Client, tmp_path) -> dict:
    """Submit, poll to succeeded, download with ETag and Range, load, and compare the top-1."""
    import erq_core

    answer = client.post("/v1/jobs", json=FIXTURE_JOB)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    seen_progress = set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        seen_progress.add(job["progress"])
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    assert len(seen_progress) >= 3 and max(seen_progress) == 1.0  # progress moved while it ran
    artifacts = {a["name"]: a for a in job["artifacts"]}
    assert set(artifacts) == {"quantized.safetensors", "config.json", "metrics.json", "job.log", "report.html"}

    folder = tmp_path / "downloaded"
    folder.mkdir()
    for name in ("quantized.safetensors", "config.json"):
        response = client.get(artifacts[name]["url"])
        assert response.status_code == 200
        assert response.headers["ETag"].strip('"') == hashlib.sha256(response.content).hexdigest()
        assert response.headers["ETag"].strip('"') == artifacts[name]["sha256"]
        assert f'filename="{name}"' in response.headers["Content-Disposition"]
        (folder / name).write_bytes(response.content)
    partial = client.get(artifacts["quantized.safetensors"]["url"], headers={"Range": "bytes=100-299"})
    assert partial.status_code == 206 and partial.content == (folder / "quantized.safetensors").read_bytes()[100:300]

    model = erq_core.load_quantized(folder)  # a runnable model rebuilt from the downloaded files alone
    assert not model.training
    result = erq_core.evaluate_quantized(folder, FIXTURE_DATASET, val_limit=VAL_LIMIT, device="cpu")
    assert result["top1"] == job["metrics"]["quantized"]["top1"]
    assert result["n"] == job["metrics"]["n_val"] == VAL_LIMIT
    assert "succeeded" in client.get(f"/v1/jobs/{job_id}/log").text
    return job


def get_twice_on_one_connection(port: int, idle_seconds: float) -> list[int]:
    """GET /healthz, stay idle, GET again on the same connection: the two answers' status codes."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    statuses = []
    try:
        for pause in (0, idle_seconds):
            time.sleep(pause)
            connection.request("GET", "/healthz")
            if pause == 0:
                first_socket = connection.sock
            answer = connection.getresponse()  # RemoteDisconnected if the server closed the connection
            answer.read()
            statuses.append(answer.status)
        assert connection.sock is first_socket  # http.client did not open a new one
    finally:
        connection.close()
    return statuses


def test_embedded_default_end_to_end(tmp_path):
    with serving(tmp_path, service_env(tmp_path)) as (serve, client):
        assert client.get("/readyz").json()["status"] == "ready"
        # clients such as httpx keep an idle connection 5 s: the server must keep it longer, or a
        # request sent on it just as the server closes it fails
        assert get_twice_on_one_connection(client.base_url.port, idle_seconds=6) == [200, 200]
        job = check_fixture_job(client, tmp_path)
        wrong = client.get("/v1/jobs", headers={"Authorization": "Bearer erq_a-wrong-guess-1234"})
        assert wrong.status_code == 401
        job_log = client.get(f"/v1/jobs/{job['id']}/log").text
        serve.send_signal(__import__("signal").SIGINT)  # one Ctrl-C stops API and worker
        assert serve.wait(30) == 0
    log = tmp_path / "serve.log"
    key = (tmp_path / "var" / "api-key").read_text().strip()
    assert "Shutting down" in log.read_text()
    for text in (log.read_text(), job_log):  # API keys, right or wrong, never reach a log
        assert key not in text and "a-wrong-guess" not in text


def test_redis_and_postgresql_end_to_end(tmp_path, redis_broker, postgres_url):
    broker_url, queue = redis_broker
    env = service_env(tmp_path, ERQ_DATABASE_URL=postgres_url, ERQ_BROKER_URL=broker_url, ERQ_QUEUE=queue)
    created = run_erq(["admin", "create-key", "ci"], env, tmp_path)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    with erq_process(["worker"], env, tmp_path, tmp_path / "worker.log"), \
            api_process(["api"], env, tmp_path, tmp_path / "api.log") as (api, port):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                          timeout=30) as client:
            assert client.get("/readyz").json() == {"status": "ready", "database": "ok", "broker": "ok",
                                                    "artifact_store": "ok"}
            job = check_fixture_job(client, tmp_path)
            assert job["attempts"] == 1
            metrics = client.get("/metrics").text
            assert 'erq_jobs{status="succeeded"} 1.0' in metrics
    revoked = run_erq(["admin", "revoke-key", key[:12]], env, tmp_path)
    assert revoked.returncode == 0 and "revoked key" in revoked.stdout
