"""Workers as real processes: slots and devices, the engine loaded at start, the healthcheck, logs
that hold one job, the database's clock, a database cut off when a job ends, and attempt folders."""
from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from sqlalchemy import select

from storage import jobs
from storage.artifacts.folder import FolderStore
from storage.db import session_scope
from storage.keys import find_key
from storage.models import Job, JobStatus, db_now
from storage.queue import enqueue, make_celery
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import ON_POSTGRESQL, ON_SQLITE, make_key, run_erq, service_env
from tests.service.processes import api_client, api_process, erq_process, wait_for_job, wait_for_text
from tests.service.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration  # real erq processes

QUICK_JOB = {"model": f"local-dir:{FIXTURE_MODEL_DIR}", "dataset": str(FIXTURE_DATASET), "calib_size": 32,
             "val_limit": 50}
SLOW_JOB = {**QUICK_JOB, "calib_size": 320, "val_limit": None}
ENDED = ("succeeded", "failed", "cancelled")


def _running_past_start(client: httpx.Client, job_id: str) -> dict:
    job = wait_for_job(client, job_id, ("running",), 120)
    while job["stage"] in (None, "starting", "load_model"):
        job = client.get(f"/v1/jobs/{job_id}").json()
        time.sleep(0.1)
    return job


@contextmanager
def api(tmp_path: Path, env: dict, key: str) -> Iterator[httpx.Client]:
    with api_process(["api"], env, tmp_path, tmp_path / "api.log") as (process, port):
        with api_client(port, key) as client:
            yield client


def _env(tmp_path: Path, settings, **overrides: str) -> dict:
    return service_env(tmp_path, ERQ_DATABASE_URL=settings.database_url, ERQ_BROKER_URL=settings.broker_url,
                       **overrides)


@ON_SQLITE
def test_two_slots_run_two_jobs_at_once_with_data_loader_processes(tmp_path, settings):
    """`--concurrency 2`: each job runs in its own (non-daemonic) slot process, whose data loaders
    start worker processes of their own."""
    env = _env(tmp_path, settings, ERQ_LOADER_WORKERS="2", ERQ_MAX_ACTIVE_JOBS_PER_OWNER="10")
    key = make_key(settings, "alice")
    log = tmp_path / "worker.log"
    with erq_process(["worker", "--concurrency", "2"], env, tmp_path, log) as worker, api(tmp_path, env, key) as client:
        wait_for_text(log, "2 slots on CPU, CPU", process=worker)
        ids = [client.post("/v1/jobs", json={**QUICK_JOB, "val_limit": 200}).json()["id"] for _ in range(2)]
        ended = [wait_for_job(client, job_id, ENDED, 300) for job_id in ids]
        logs = [client.get(f"/v1/jobs/{job_id}/log").text for job_id in ids]
    assert [job["status"] for job in ended] == ["succeeded"] * 2, [job["error"] for job in ended]
    assert all("data loaders: 2 worker processes" in text for text in logs)
    with session_scope(settings.database_url) as session:
        runs = session.execute(select(Job.worker, Job.started_at, Job.finished_at).where(Job.id.in_(ids))).all()
    assert runs[0].worker != runs[1].worker  # two slot processes
    first, second = sorted(runs, key=lambda run: run.started_at)
    assert second.started_at < first.finished_at  # at the same time


def test_a_worker_told_to_use_cuda_without_a_gpu_refuses_to_start(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = service_env(tmp_path, ERQ_DEVICE="cuda")
    for args in (["worker"], ["worker", "--concurrency", "2"]):
        result = run_erq(args, env, tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "ERQ_DEVICE=cuda but no CUDA GPU is visible" in result.stderr


def test_erq_serve_whose_worker_cannot_start_stops_with_code_2_instead_of_restarting_it_forever(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = service_env(tmp_path, ERQ_DEVICE="cuda")
    result = subprocess.run([str(Path(sys.executable).parent / "erq"), "serve", "--port", "0"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("ERQ_DEVICE=cuda but no CUDA GPU is visible") == 1  # started once, not again
    assert "the embedded worker cannot start as configured" in result.stderr



def test_an_artifact_folder_that_cannot_be_created_stops_api_and_worker_with_what_to_fix(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = service_env(tmp_path, ERQ_ARTIFACT_DIR=str(blocker / "artifacts"))
    for args, code in ((["worker"], 2), (["api"], 1), (["migrate"], 1)):
        result = run_erq(args, env, tmp_path)
        assert result.returncode == code, result.stderr[-2000:]
        assert f"cannot create the folder {blocker / 'artifacts'} (from ERQ_ARTIFACT_DIR" in result.stderr
        assert "Traceback" not in result.stderr

@ON_SQLITE
def test_the_engine_is_loaded_when_the_worker_starts_and_the_healthcheck_follows_its_sweeps(tmp_path, settings):
    health = tmp_path / "worker.alive"
    env = _env(tmp_path, settings, ERQ_WORKER_HEALTH_FILE=str(health))
    log = tmp_path / "worker.log"
    assert run_erq(["worker", "--healthcheck"], env, tmp_path).returncode == 1  # no worker yet
    with erq_process(["worker"], env, tmp_path, log) as worker:
        wait_for_text(log, "erq worker ready: torch", process=worker)  # before any job
        assert "on cpu" in log.read_text()
        deadline = time.monotonic() + 30
        while not health.exists():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        healthy = run_erq(["worker", "--healthcheck"], env, tmp_path)
        assert healthy.returncode == 0, healthy.stderr
        os.kill(worker.pid, signal.SIGSTOP)  # a hung worker stops sweeping: its file ages
        try:
            old = time.time() - 120
            os.utime(health, (old, old))
            stale = run_erq(["worker", "--healthcheck"], env, tmp_path)
            assert stale.returncode == 1 and re.search(r"last sweep was 1[2-9]\d s ago", stale.stderr), stale.stderr
        finally:
            os.kill(worker.pid, signal.SIGCONT)


@ON_SQLITE
def test_a_worker_given_a_job_its_database_does_not_know_logs_an_error(tmp_path, settings):
    env = _env(tmp_path, settings)
    log = tmp_path / "worker.log"
    with erq_process(["worker"], env, tmp_path, log) as worker:
        wait_for_text(log, "erq worker ready", process=worker)
        enqueue(make_celery(settings), "f" * 32)  # e.g. another service sharing the broker
        wait_for_text(log, f"ERROR job {'f' * 32} is not in this worker's database", 60, worker)
    assert "ERQ_HOME" in log.read_text()


def test_erq_home_holds_the_database_the_broker_and_the_artifacts(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERQ_")}
    env["ERQ_HOME"] = str(home)
    created = run_erq(["admin", "create-key", "alice"], env, tmp_path)
    assert created.returncode == 0, created.stderr
    assert (home / "erq.sqlite").is_file() and (home / "artifacts").is_dir() and not (tmp_path / "var").exists()
    from storage.settings import Settings

    other = Settings(home=tmp_path / "other")
    assert other.broker_url == f"sqla+sqlite:///{tmp_path / 'other' / 'broker.sqlite'}"
    assert other.database_url == f"sqlite:///{tmp_path / 'other' / 'erq.sqlite'}"
    assert Settings(home=home, artifact_dir=tmp_path / "elsewhere").artifact_dir == tmp_path / "elsewhere"


@ON_SQLITE
def test_a_jobs_log_holds_only_that_jobs_lines(tmp_path, settings):
    """The sweeper logs about another owner's job while this job runs: not into this job's log."""
    env = _env(tmp_path, settings, ERQ_MAX_ATTEMPTS="3")
    key, others = make_key(settings, "alice"), make_key(settings, "bob")
    with session_scope(settings.database_url) as session:  # bob's job, whose worker went silent
        other = jobs.create_job(session, find_key(session, others).owner_id, dict(QUICK_JOB)).id
    with session_scope(settings.database_url) as session:
        jobs.claim(session, other, "gone:1")
        session.get(Job, other).heartbeat_at = db_now(-3600)
    log = tmp_path / "worker.log"
    with erq_process(["worker"], env, tmp_path, log), api(tmp_path, env, key) as client:
        job_id = client.post("/v1/jobs", json=SLOW_JOB).json()["id"]
        _running_past_start(client, job_id)
        wait_for_text(log, f"job {other} lost its worker; re-queued", 60)
        client.post(f"/v1/jobs/{job_id}/cancel")
        assert wait_for_job(client, job_id, ENDED, 60)["status"] == "cancelled"
        job_log = client.get(f"/v1/jobs/{job_id}/log").text
    assert f"job {job_id}" in job_log and other not in job_log


def _faketime() -> str:
    library = next(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"), None)
    if library is None:
        if os.environ.get("CI"):
            pytest.fail("libfaketime is required in CI (apt-get install faketime)")
        pytest.skip("libfaketime is not installed (apt-get install faketime)")
    return str(library)


@ON_POSTGRESQL
def test_leases_use_the_database_clock_not_the_workers(tmp_path, settings):
    """A worker whose clock is 10 minutes behind runs a job while another worker (right clock) sweeps
    leases every 5 s: the job is never taken for lost."""
    env = _env(tmp_path, settings, ERQ_LEASE_SECONDS="20")
    key = make_key(settings, "alice")
    skewed = {**env, "LD_PRELOAD": _faketime(), "FAKETIME": "-10m", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    with erq_process(["worker"], skewed, tmp_path, tmp_path / "skewed.log") as runner, \
            erq_process(["worker", "--queues", "nothing-here"], env, tmp_path, tmp_path / "sweeper.log"), \
            api(tmp_path, env, key) as client:
        wait_for_text(tmp_path / "skewed.log", "erq worker ready", process=runner)
        job_id = client.post("/v1/jobs", json={**QUICK_JOB, "val_limit": 500}).json()["id"]
        job = wait_for_job(client, job_id, ENDED, 300)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    assert "lost its worker" not in (tmp_path / "sweeper.log").read_text()


@ON_POSTGRESQL
def test_a_database_cut_when_the_job_ends_loses_no_result(tmp_path, settings):
    proxy = TcpProxy(5432)
    through_proxy = settings.database_url.replace(":5432/", f":{proxy.port}/")
    env = _env(tmp_path, settings)
    key = make_key(settings, "alice")
    log = tmp_path / "worker.log"
    try:
        with erq_process(["worker"], {**env, "ERQ_DATABASE_URL": through_proxy}, tmp_path, log), \
                api(tmp_path, env, key) as client:
            # long enough to be still running when the cut comes, on a fast machine too (a quick job
            # could end, and record its outcome, between the poll that saw it running and the cut)
            job_id = client.post("/v1/jobs", json=SLOW_JOB).json()["id"]
            _running_past_start(client, job_id)
            proxy.cut()
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"  # the API is not cut off
            wait_for_text(log, "cannot record the job's outcome yet", 120)
            time.sleep(3)  # a few more failed tries
            proxy.restore()
            job = wait_for_job(client, job_id, ENDED, 60)
    finally:
        proxy.close()
    assert job["status"] == "succeeded" and job["attempts"] == 1 and job["metrics"]["quantized"]["top1"], job


@ON_POSTGRESQL
def test_a_run_that_lost_its_lease_but_kept_working_never_touches_the_published_files(tmp_path, settings):
    """Worker A is frozen and cut from the database mid-job; its lease expires and worker B runs the
    job to the end. Then A wakes, still cut off, finishes its own run and writes its files: into its
    own attempt folder. The files served are B's, matching the recorded checksums."""
    proxy = TcpProxy(5432)
    env = _env(tmp_path, settings, ERQ_LEASE_SECONDS="4")
    key = make_key(settings, "alice")
    a_log = tmp_path / "worker-a.log"
    try:
        with erq_process(["worker"], {**env, "ERQ_DATABASE_URL": settings.database_url.replace(
                ":5432/", f":{proxy.port}/")}, tmp_path, a_log) as worker_a, api(tmp_path, env, key) as client:
            job_id = client.post("/v1/jobs", json={**SLOW_JOB, "val_limit": 500}).json()["id"]
            _running_past_start(client, job_id)
            os.killpg(worker_a.pid, signal.SIGSTOP)
            proxy.cut()
            try:
                with erq_process(["worker"], env, tmp_path, tmp_path / "worker-b.log"):
                    job = wait_for_job(client, job_id, ENDED, 240)
                    assert (job["status"], job["attempts"]) == ("succeeded", 2), job
            finally:
                os.killpg(worker_a.pid, signal.SIGCONT)
            wait_for_text(a_log, "cannot record the job's outcome yet", 180)
            proxy.restore()
            time.sleep(3)  # A's outcome is refused: the job ended with B's run
            job = client.get(f"/v1/jobs/{job_id}").json()
            for artifact in job["artifacts"]:
                content = client.get(artifact["url"]).content
                import hashlib

                assert hashlib.sha256(content).hexdigest() == artifact["sha256"], artifact["name"]
            metrics = client.get(next(a["url"] for a in job["artifacts"] if a["name"] == "metrics.json")).json()
    finally:
        proxy.close()
    assert metrics == job["metrics"]
    folder = FolderStore(settings.artifact_dir).job_dir(job_id)
    assert (folder / "attempt-1" / "metrics.json").is_file()  # A's own result, not published
    with session_scope(settings.database_url) as session:
        assert session.get(Job, job_id).published_run == "attempt-2"


def _decompression_bomb_png(path: Path) -> None:
    """A tiny PNG whose header claims 20000 x 20000 pixels (PIL refuses over 2 x 89.5 M pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@ON_SQLITE
def test_a_decompression_bomb_fails_the_job_naming_the_file(settings, data_root):
    from worker.tasks import execute_job

    dataset = data_root / "bomb"
    shutil.copytree(FIXTURE_DATASET, dataset)
    bomb = next((dataset / "val").glob("*/*.png"))
    _decompression_bomb_png(bomb)
    key = make_key(settings, "alice")
    with session_scope(settings.database_url) as session:
        job_id = jobs.create_job(session, find_key(session, key).owner_id,
                                 {**QUICK_JOB, "dataset": str(dataset), "val_limit": None}).id
    execute_job(job_id, settings)
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.FAILED and str(bomb) in job.error and "cannot read image" in job.error
        assert "decompression bomb" in job.error.lower()
