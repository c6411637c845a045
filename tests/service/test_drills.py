"""Drills with real processes: the API killed under load, and Redis restarted without persistence.
Whatever the outage, every job that was accepted (202) ends, and none is left queued with no
broker message behind it (worker/queue_repairs.py OrphanedJobs)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from sqlalchemy import select

from storage import jobs
from storage.db import session_scope
from storage.keys import find_key
from storage.models import Job, db_now
from storage.queue import enqueue, make_celery, ready_messages
from worker.queue_repairs import ORPHAN_GRACE_SECONDS, OrphanedJobs
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import ON_POSTGRESQL, ON_SQLITE, _unavailable, make_key, service_env
from tests.service.processes import api_client, api_process, erq_process, free_port, wait_for_job

pytestmark = pytest.mark.integration  # real erq processes, a Redis of its own

SHORT_JOB = {"model": f"local-dir:{FIXTURE_MODEL_DIR}", "dataset": str(FIXTURE_DATASET), "calib_size": 32,
             "evaluate": False}
ENDED = ("succeeded", "failed", "cancelled")
# Time for every accepted job to end: the orphan sweep's grace and two sweeps, then the jobs in turn.
DRILL_SECONDS = 150

def _wait_all_ended(client: httpx.Client, job_ids: list[str], seconds: float) -> dict[str, dict]:
    deadline = time.monotonic() + seconds
    return {job_id: wait_for_job(client, job_id, ENDED, max(1.0, deadline - time.monotonic())) for job_id in job_ids}


class Submitters:
    """Threads that POST jobs one after another (up to `per_thread` each) until the API stops answering."""

    def __init__(self, port: int, key: str, threads: int, per_thread: int):
        self.port, self.key, self.per_thread = port, key, per_thread
        self.accepted: list[str] = []
        self.statuses: list[int] = []
        self.cut = 0  # requests the API never answered
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._submit, daemon=True) for _ in range(threads)]

    def _submit(self) -> None:
        with api_client(self.port, self.key) as client:
            for _ in range(self.per_thread):
                try:
                    answer = client.post("/v1/jobs", json=SHORT_JOB)
                except httpx.TransportError:
                    with self.lock:
                        self.cut += 1
                    return
                with self.lock:
                    self.statuses.append(answer.status_code)
                    if answer.status_code == 202:
                        self.accepted.append(answer.json()["id"])

    def __enter__(self) -> "Submitters":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        for thread in self.threads:
            thread.join(60)

    def wait_accepted(self, count: int, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while len(self.accepted) < count:
            assert time.monotonic() < deadline, f"only {len(self.accepted)} jobs accepted: {self.statuses}"
            time.sleep(0.02)


def _sigkill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@ON_SQLITE
def test_the_api_killed_during_load_then_restarted_every_accepted_job_ends(tmp_path, settings):
    env = service_env(tmp_path, ERQ_DATABASE_URL=settings.database_url, ERQ_BROKER_URL=settings.broker_url,
                      ERQ_MAX_ACTIVE_JOBS_PER_KEY="50", ERQ_OWNER_REQUESTS_PER_SECOND="0")  # a burst of one owner
    key = make_key(settings, "alice")
    api_log = tmp_path / "api.log"
    with erq_process(["worker"], env, tmp_path, tmp_path / "worker.log") as worker:
        with api_process(["api"], env, tmp_path, api_log) as (api, port):
            with Submitters(port, key, threads=3, per_thread=20) as load:
                load.wait_accepted(4)
                _sigkill(api)
        assert load.cut and set(load.statuses) == {202}, (load.cut, load.statuses)  # killed mid-request
        with session_scope(settings.database_url) as session:  # a kill between commit and enqueue, for sure
            orphan = jobs.create_job(session, find_key(session, key).owner_id, dict(SHORT_JOB), None).id
        with session_scope(settings.database_url) as session:
            everything = list(session.scalars(select(Job.id)))
        with api_process(["api"], env, tmp_path, api_log) as (api, port):
            with api_client(port, key) as client:
                ended = _wait_all_ended(client, everything, DRILL_SECONDS)
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
    assert orphan in ended and set(load.accepted) <= set(ended)
    # Every job, the accepted ones and those whose POST the kill cut short, ends; none is left queued.
    assert {job_id: job["status"] for job_id, job in ended.items()} == dict.fromkeys(ended, "succeeded")


@contextmanager
def redis_server(port: int, log: Path) -> Iterator[subprocess.Popen]:
    """A private redis-server without persistence: what a restart loses is gone."""
    binary = shutil.which("redis-server")
    if binary is None:
        _unavailable("redis-server", "not on PATH")
    with open(log, "ab") as out:
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--daemonize", "no"], stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port, socket_connect_timeout=1).ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            _sigkill(process)


@ON_POSTGRESQL
def test_redis_restarted_during_load_loses_no_accepted_job(tmp_path, settings):
    redis_port = free_port()
    env = service_env(tmp_path, ERQ_DATABASE_URL=settings.database_url,
                      ERQ_BROKER_URL=f"redis://127.0.0.1:{redis_port}/0", ERQ_MAX_ACTIVE_JOBS_PER_KEY="50")
    key = make_key(settings, "alice")
    redis_log = tmp_path / "redis.log"
    with redis_server(redis_port, redis_log) as broker, \
            erq_process(["worker"], env, tmp_path, tmp_path / "worker.log") as worker, \
            api_process(["api"], env, tmp_path, tmp_path / "api.log") as (api, port):
        with api_client(port, key) as client:
            before = [client.post("/v1/jobs", json=SHORT_JOB) for _ in range(4)]
            assert [answer.status_code for answer in before] == [202] * 4, [a.text for a in before]
            accepted = [answer.json()["id"] for answer in before]
            wait_for_job(client, accepted[0], ("running", *ENDED), 60)
            _sigkill(broker)
            at_kill = [client.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in accepted]
            assert "queued" in at_kill, at_kill  # their messages went with Redis

            during = client.post("/v1/jobs", json=SHORT_JOB)  # not accepted, and said so
            assert during.status_code == 503 and during.headers["Retry-After"], during.text

            with redis_server(redis_port, redis_log):
                after = [client.post("/v1/jobs", json=SHORT_JOB) for _ in range(2)]  # the API reconnects
                assert [answer.status_code for answer in after] == [202] * 2, [a.text for a in after]
                accepted += [answer.json()["id"] for answer in after]
                ended = _wait_all_ended(client, accepted, DRILL_SECONDS)
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
    assert {job_id: job["status"] for job_id, job in ended.items()} == dict.fromkeys(ended, "succeeded")


def _queued_job(settings, age_seconds: float = 0) -> str:
    """A queued job created `age_seconds` ago, with no broker message."""
    key = make_key(settings, f"key-{time.monotonic_ns()}")
    with session_scope(settings.database_url) as session:
        job = jobs.create_job(session, find_key(session, key).owner_id, dict(SHORT_JOB), None)
        job.created_at = db_now(-age_seconds)
        return job.id


def test_the_orphan_sweep_resends_old_queued_jobs_when_two_sweeps_in_a_row_find_messages_missing(settings):
    app = make_celery(settings)
    orphan = _queued_job(settings, ORPHAN_GRACE_SECONDS + 2)
    with_message = _queued_job(settings, ORPHAN_GRACE_SECONDS + 1)
    enqueue(app, with_message)
    _queued_job(settings)  # young: its message may still be on its way
    sweep = OrphanedJobs(app, settings)
    assert sweep.reannounce() == []  # a shortfall seen once may be a message taken but not yet claimed
    assert sweep.reannounce() == [orphan, with_message]  # which message is missing cannot be told
    assert ready_messages(app, settings) == 3
    assert sweep.reannounce() == []


@ON_SQLITE
def test_the_orphan_sweep_with_redis_down_only_logs_and_recovers_once_redis_is_back(settings, tmp_path, caplog):
    port = free_port()  # a Redis started later on this port
    settings = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{port}/0"})
    app = make_celery(settings)
    orphan = _queued_job(settings, ORPHAN_GRACE_SECONDS + 1)
    sweep = OrphanedJobs(app, settings)
    assert sweep.reannounce() == []
    assert "the broker is unreachable" in caplog.text
    with redis_server(port, tmp_path / "redis.log"):
        assert sweep.reannounce() == []
        assert sweep.reannounce() == [orphan]
        assert ready_messages(app, settings) == 1
