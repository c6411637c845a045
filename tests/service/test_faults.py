"""Cancelling a running job, and a worker killed mid-job."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest

from storage import jobs
from storage.db import session_scope
from storage.models import Job, db_now
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import ON_POSTGRESQL, ON_SQLITE, make_key, service_env, worker_and_api
from tests.service.processes import api_client, api_process, erq_process, serving, wait_for_job

pytestmark = pytest.mark.integration  # real erq processes

SLOW_JOB = {"model": f"local-dir:{FIXTURE_MODEL_DIR}", "dataset": str(FIXTURE_DATASET), "calib_size": 320}
QUICK_JOB = {**SLOW_JOB, "calib_size": 32, "val_limit": 50}
MEDIUM_JOB = {**SLOW_JOB, "calib_size": 128, "val_limit": 200}
# erq+ --reconstruct with 100,000 steps per block: one block outlasts any test
RECONSTRUCTING_JOB = {**QUICK_JOB, "method": "erq+", "reconstruct": True, "reconstruct_iters": 100_000,
                      "reconstruct_images": 32}

def _wait_running_past_start(client: httpx.Client, job_id: str, seconds: float = 120) -> dict:
    """The job once it runs past loading its model; fails if it ends first or after `seconds`."""
    deadline = time.monotonic() + seconds
    job = wait_for_job(client, job_id, ("running",), seconds)
    while job["stage"] in (None, "starting", "load_model"):
        assert job["status"] == "running" and time.monotonic() < deadline, job
        time.sleep(0.1)
        job = client.get(f"/v1/jobs/{job_id}").json()
    return job


def _wait_reconstructing(client: httpx.Client, job_id: str) -> dict:
    job = wait_for_job(client, job_id, ("running",), 120)
    deadline = time.monotonic() + 240
    while job["stage"] != "reconstruct":
        assert time.monotonic() < deadline and job["status"] == "running", job
        time.sleep(0.3)
        job = client.get(f"/v1/jobs/{job_id}").json()
    return job


@ON_SQLITE
def test_cancel_a_running_job_then_the_worker_takes_the_next(tmp_path, settings):
    with worker_and_api(tmp_path, settings) as client:
        slow = client.post("/v1/jobs", json=SLOW_JOB).json()["id"]
        _wait_running_past_start(client, slow)
        assert client.post(f"/v1/jobs/{slow}/cancel").status_code == 200
        cancelled = wait_for_job(client, slow, ("cancelled", "succeeded", "failed"), 30)
        assert cancelled["status"] == "cancelled" and cancelled["error"] == "cancelled by the client"
        assert [a["name"] for a in cancelled["artifacts"]] == ["job.log"]  # the log only, no results
        quick = client.post("/v1/jobs", json=QUICK_JOB).json()["id"]
        assert wait_for_job(client, quick, ("succeeded", "failed"), 120)["status"] == "succeeded"


@ON_SQLITE
def test_cancel_during_reconstruction_stops_the_job_within_the_block(tmp_path, settings):
    """erq+ --reconstruct learns each block for reconstruct_iters steps, 100,000 here: far longer than
    this test waits. Its steps report progress (stage `reconstruct`), where a cancel is seen."""
    with worker_and_api(tmp_path, settings) as client:
        job_id = client.post("/v1/jobs", json=RECONSTRUCTING_JOB).json()["id"]
        running = _wait_reconstructing(client, job_id)
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        cancelled = wait_for_job(client, job_id, ("cancelled", "succeeded", "failed"), 60)
        log = client.get(f"/v1/jobs/{job_id}/log").text
    assert cancelled["status"] == "cancelled", cancelled
    assert cancelled["progress"] == running["progress"] > 0  # the layers' progress holds while a block learns
    assert "reconstructed" not in log, log  # no block's reconstruction ended: the cancel was seen within one


@ON_POSTGRESQL
def test_a_worker_killed_mid_job_leaves_the_job_rerun(tmp_path, settings):
    env = service_env(tmp_path, ERQ_DATABASE_URL=settings.database_url, ERQ_BROKER_URL=settings.broker_url,
                      ERQ_LEASE_SECONDS="4", ERQ_MAX_ATTEMPTS="2")
    key = make_key(settings, "alice")
    with api_process(["api"], env, tmp_path, tmp_path / "api.log") as (api, port):
        with api_client(port, key) as client:
            job_id = client.post("/v1/jobs", json=MEDIUM_JOB).json()["id"]
            with erq_process(["worker"], env, tmp_path, tmp_path / "worker1.log") as first:
                _wait_running_past_start(client, job_id)
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"  # until the lease expires
            with erq_process(["worker"], env, tmp_path, tmp_path / "worker2.log"):
                job = wait_for_job(client, job_id, ("succeeded", "failed"), 240)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job


@ON_SQLITE
def test_a_job_past_erq_max_job_seconds_fails_with_the_reason(tmp_path, settings):
    with worker_and_api(tmp_path, settings, ERQ_MAX_JOB_SECONDS="1") as client:
        job_id = client.post("/v1/jobs", json=SLOW_JOB).json()["id"]
        job = wait_for_job(client, job_id, ("succeeded", "failed", "cancelled"), 120)
        assert job["status"] == "failed" and "ERQ_MAX_JOB_SECONDS=1" in job["error"], job
        assert job["error_code"] == "job_timed_out"
        assert "ERQ_MAX_JOB_SECONDS=1" in client.get(f"/v1/jobs/{job_id}/log").text


def test_ctrl_c_on_serve_requeues_the_running_job_and_the_next_start_runs_it(tmp_path):
    env = service_env(tmp_path)
    with serving(tmp_path, env) as (serve, client):
        job_id = client.post("/v1/jobs", json=SLOW_JOB).json()["id"]
        _wait_running_past_start(client, job_id)
        serve.send_signal(signal.SIGINT)
        assert serve.wait(30) == 0
    with session_scope(env["ERQ_DATABASE_URL"]) as session:  # back in the queue at once, no attempt spent
        job = session.get(Job, job_id)
        assert (job.status, job.attempts, job.worker) == ("queued", 0, None), job.stage
    with serving(tmp_path, env) as (serve, client):
        job = wait_for_job(client, job_id, ("running", "succeeded", "failed"), 60)
        assert job["status"] == "running" and job["attempts"] == 1 and job["heartbeat_at"]
        client.post(f"/v1/jobs/{job_id}/cancel")
        assert wait_for_job(client, job_id, ("cancelled", "succeeded", "failed"), 30)["status"] == "cancelled"


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_serve_stopped_by_a_signal_stops_its_worker_warm(tmp_path, stop):
    """A service manager's stop (SIGTERM) as Ctrl-C (SIGINT): erq serve exits only once its embedded
    worker has handed the running job back and exited, leaving no worker behind. The job is inside a
    block's reconstruction, which outlasts the worker's 10 s to stop warm before it is killed."""
    env = service_env(tmp_path)
    worker_pid = None
    try:
        with serving(tmp_path, env) as (serve, client):
            job_id = client.post("/v1/jobs", json=RECONSTRUCTING_JOB).json()["id"]
            _wait_reconstructing(client, job_id)
            with session_scope(env["ERQ_DATABASE_URL"]) as session:
                worker_pid = int(session.get(Job, job_id).worker.rsplit(":", 1)[1])
            serve.send_signal(stop)
            assert serve.wait(60) == 0, (tmp_path / "serve.log").read_text()[-2000:]
        with session_scope(env["ERQ_DATABASE_URL"]) as session:  # handed back: queued, no attempt spent
            job = session.get(Job, job_id)
            assert (job.status, job.attempts, job.worker) == ("queued", 0, None), job.stage
        with pytest.raises(ProcessLookupError):
            os.kill(worker_pid, 0)
    finally:
        if worker_pid is not None:
            try:
                os.kill(worker_pid, signal.SIGKILL)  # an orphan must not go on consuming the queue
            except ProcessLookupError:
                pass


def test_an_expired_lease_on_the_last_attempt_fails_the_job_with_a_reason(settings):
    key = make_key(settings, "alice")
    with session_scope(settings.database_url) as session:
        from storage.keys import find_key

        job = jobs.create_job(session, find_key(session, key).owner_id, dict(QUICK_JOB), None)
        job_id = job.id
        assert jobs.claim(session, job_id, "host:1") is not None
        session.get(Job, job_id).heartbeat_at = db_now(-60)
    with session_scope(settings.database_url) as session:
        assert jobs.expire_leases(session, lease_seconds=30, max_attempts=1) == []
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job.status == "failed" and "host:1 stopped answering" in job.error and job.error_code == "worker_lost"
        assert jobs.claim(session, job_id, "host:2") is None  # a late redelivery does not run it again


@pytest.fixture
def full_volume(tmp_path):
    """A 256 KiB tmpfs: too small for the fixture's quantized checkpoint."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@ON_SQLITE
def test_a_full_artifact_volume_fails_the_job_with_a_reason_and_lists_nothing_partial(settings, full_volume):
    from worker.tasks import execute_job

    settings = settings.model_copy(update={"artifact_dir": full_volume})
    key = make_key(settings, "alice")
    with session_scope(settings.database_url) as session:
        from storage.keys import find_key

        job_id = jobs.create_job(session, find_key(session, key).owner_id, {**QUICK_JOB, "evaluate": False}, None).id
    execute_job(job_id, settings)
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job.status == "failed" and "No space left on device" in job.error and job.error_code == "storage_error"
        assert [a.name for a in job.artifacts] == ["job.log"]
    assert not list((full_volume / job_id).rglob("*.tmp"))  # in the attempt folder too


@ON_POSTGRESQL
def test_dataset_trouble_found_while_running_fails_the_job_naming_the_file(settings, data_root):
    import shutil

    from tests.fixture_paths import FIXTURE_DATASET
    from worker.tasks import execute_job

    dataset = data_root / "broken"
    shutil.copytree(FIXTURE_DATASET, dataset)
    corrupt = next((dataset / "val").glob("*/*.png"))
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    key = make_key(settings, "alice")
    with session_scope(settings.database_url) as session:
        from storage.keys import find_key

        key_id = find_key(session, key).owner_id
        broken = jobs.create_job(session, key_id, {**QUICK_JOB, "dataset": str(dataset), "val_limit": None}, None).id
        healthy = jobs.create_job(session, key_id, dict(QUICK_JOB), None).id
    execute_job(broken, settings)
    execute_job(healthy, settings)  # the same worker goes on with the next job
    with session_scope(settings.database_url) as session:
        job = session.get(Job, broken)
        assert job.status == "failed" and str(corrupt) in job.error and "cannot read image" in job.error
        assert job.error_code == "invalid_dataset"
        assert session.get(Job, healthy).status == "succeeded"
