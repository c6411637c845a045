"""GET /v1/jobs/{id}/events: Server-Sent Events from a real `erq api` process, followed with a real
HTTP client, the job driven by the job-state code the workers use or by a real worker."""
from __future__ import annotations

import json
import re
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
import pytest

from storage import jobs
from storage.artifacts import stored_file
from storage.db import session_scope
from storage.artifacts.folder import FolderStore
from storage.models import JobStatus
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import ON_POSTGRESQL, ON_SQLITE, make_key, run_erq, service_env, worker_and_api
from tests.service.processes import api_client, api_process
from tests.service.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration  # a real erq api process

JOB = {"model": f"local-dir:{FIXTURE_MODEL_DIR}", "dataset": str(FIXTURE_DATASET), "val_limit": 50}


def read_events(client: httpx.Client, job_id: str, last_event_id: str | None = None,
                timeout: float = 120, sink: list | None = None) -> list[dict]:
    """Every event of the stream until the server ends it: [{id, event, data}] (appended to `sink` as
    they arrive, when given)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events, current = ([] if sink is None else sink), {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as answer:
        assert answer.status_code == 200, answer.read()
        assert answer.headers["content-type"].startswith("text/event-stream")
        for line in answer.iter_lines():
            if not line:
                if "event" in current:
                    events.append(current)
                current = {}
            elif line.startswith(("id:", "event:", "data:")):
                name, value = line.split(":", 1)
                current[name] = json.loads(value) if name == "data" else value.strip()
    return events


class Following(threading.Thread):
    def __init__(self, client: httpx.Client, job_id: str, last_event_id: str | None = None):
        super().__init__(daemon=True)
        self.client, self.job_id, self.last_event_id = client, job_id, last_event_id
        self.events: list[dict] | None = None  # once the stream ended
        self.so_far: list[dict] = []  # as they arrive

    def run(self) -> None:
        self.events = read_events(self.client, self.job_id, self.last_event_id, sink=self.so_far)

    def wait_for_events(self, count: int = 1, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while len(self.so_far) < count:
            assert time.monotonic() < deadline and self.is_alive(), self.so_far
            time.sleep(0.1)


@contextmanager
def api_only(tmp_path, settings, database_url: str | None = None) -> Iterator[httpx.Client]:
    # One owner follows with hundreds of streams here: the per-owner limits (tested in test_load_limits.py) off.
    env = service_env(tmp_path, ERQ_DATABASE_URL=database_url or settings.database_url,
                      ERQ_BROKER_URL=settings.broker_url, ERQ_MAX_EVENT_STREAMS_PER_OWNER="0",
                      ERQ_OWNER_REQUESTS_PER_SECOND="0")
    with api_process(["api"], env, tmp_path, tmp_path / "api.log") as (api, port):
        with api_client(port, make_key(settings, "alice")) as client:
            yield client


def run_job_by_hand(settings, job_id: str, lines: list[str]) -> None:
    """What a worker does: claim, progress, log lines, finish."""
    with session_scope(settings.database_url) as session:
        attempt = jobs.claim(session, job_id, "w1").attempts
    folder = FolderStore(settings.artifact_dir).fresh_run_dir(job_id, f"attempt-{attempt}")
    for i, line in enumerate(lines):
        with open(folder / "job.log", "a") as handle:
            handle.write(line + "\n")
        with session_scope(settings.database_url) as session:
            jobs.report_progress(session, job_id, "w1", "wqer", (i + 1) / (len(lines) + 1))
        time.sleep(0.6)
    with session_scope(settings.database_url) as session:
        jobs.finish(session, job_id, JobStatus.SUCCEEDED, metrics={}, worker="w1", run=folder.name,
                    stored=[stored_file(folder, "job.log")])


@ON_SQLITE
def test_events_follow_a_job_to_its_end_and_resume_from_an_id(tmp_path, settings):
    with api_only(tmp_path, settings) as client:
        job_id = client.post("/v1/jobs", json=JOB).json()["id"]
        following = Following(client, job_id)
        following.start()
        time.sleep(1.0)
        run_job_by_hand(settings, job_id, ["first line", "second ü line", "third line"])
        following.join(30)
        events = following.events
        assert events is not None, "the stream did not end after the terminal status"
        kinds = [e["event"] for e in events]
        assert events[0]["event"] == "status" and events[0]["data"]["status"] == "queued"
        assert events[-1]["event"] == "status" and events[-1]["data"]["status"] == "succeeded"
        assert [e["data"]["status"] for e in events if e["event"] == "status"] == ["queued", "running", "succeeded"]
        assert [e["data"]["line"] for e in events if e["event"] == "log"] == ["first line", "second ü line",
                                                                              "third line"]
        progress = [e["data"]["progress"] for e in events if e["event"] == "progress"]
        assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) >= 4
        assert kinds.index("log") < len(kinds) - 1
        assert all(re.fullmatch(r"\d+:\d+", e["id"]) for e in events)

        second_line = next(e for e in events if e["event"] == "log" and e["data"]["line"].startswith("second"))
        resumed = read_events(client, job_id, last_event_id=second_line["id"])
        assert [e["data"]["line"] for e in resumed if e["event"] == "log"] == ["third line"]
        assert resumed[-1]["data"]["status"] == "succeeded"
        assert [e["data"]["line"] for e in read_events(client, job_id, "garbage") if e["event"] == "log"] == \
            ["first line", "second ü line", "third line"]

        other = {"Authorization": f"Bearer {make_key(settings, 'bob')}"}
        assert client.get(f"/v1/jobs/{job_id}/events", headers=other).json()["code"] == "job_not_found"


@ON_POSTGRESQL
def test_a_database_outage_logs_one_traceback_and_the_stream_goes_on(tmp_path, settings):
    """The API is cut from PostgreSQL for a few seconds (many polls) while a client follows a job:
    its log gets the first failure's traceback and one line when the polls recover, not a traceback
    per poll, and the stream then follows the job to its end."""
    proxy = TcpProxy(5432)
    try:
        with api_only(tmp_path, settings, settings.database_url.replace(":5432/", f":{proxy.port}/")) as client:
            job_id = client.post("/v1/jobs", json=JOB).json()["id"]
            following = Following(client, job_id)
            following.start()
            following.wait_for_events(1)
            proxy.cut()
            time.sleep(4)  # eight polls
            proxy.restore()
            run_job_by_hand(settings, job_id, ["after the outage"])
            following.join(60)
    finally:
        proxy.close()
    assert following.events is not None and following.events[-1]["data"]["status"] == "succeeded"
    assert [e["data"]["line"] for e in following.events if e["event"] == "log"] == ["after the outage"]
    log = (tmp_path / "api.log").read_text()
    # two records from the hub: the first failure (with its traceback) and the recovery
    assert log.count("event stream poll failed") == 1 and log.count("event stream poll") == 2, log
    assert re.search(r"event stream polls recovered after [\d.]+ s \((\d+) failed\)", log), log
    assert int(re.search(r"\((\d+) failed\)", log).group(1)) >= 4, log


@ON_SQLITE
def test_many_followers_share_one_database_poll_per_tick(tmp_path, settings):
    with api_only(tmp_path, settings) as client:
        job_ids = [client.post("/v1/jobs", json=JOB).json()["id"] for _ in range(2)]
        followers = [Following(client, job_ids[i % 2]) for i in range(60)]
        for follower in followers:
            follower.start()

        def metric(name: str) -> float:
            text = client.get("/metrics").text
            return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

        deadline = time.monotonic() + 30
        while metric("erq_event_stream_followers") < 60:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        polls_before = metric("erq_event_stream_polls_total")
        time.sleep(4)
        polls = metric("erq_event_stream_polls_total") - polls_before
        assert 4 <= polls <= 12, polls  # one poll per 0.5 s tick for all 60 followers, not 60 per tick
        for job_id in job_ids:
            client.post(f"/v1/jobs/{job_id}/cancel")
        for follower in followers:
            follower.join(30)
            assert follower.events[-1]["data"]["status"] == "cancelled"
        deadline = time.monotonic() + 10
        while metric("erq_event_stream_followers") > 0:
            assert time.monotonic() < deadline
            time.sleep(0.2)


@ON_SQLITE
def test_events_of_a_real_worker_run(tmp_path, settings):
    with worker_and_api(tmp_path, settings) as client:
        job_id = client.post("/v1/jobs", json=JOB).json()["id"]
        events = read_events(client, job_id, timeout=240)
        whole_log = client.get(f"/v1/jobs/{job_id}/log").text
    assert events[-1]["event"] == "status" and events[-1]["data"]["status"] == "succeeded"
    stages = {e["data"]["stage"] for e in events if e["event"] == "progress"}
    assert len(stages) >= 3
    lines = [e["data"]["line"] for e in events if e["event"] == "log"]
    assert "\n".join(lines) + "\n" == whole_log


@ON_SQLITE
def test_a_burst_of_followers_connecting_at_once_is_served(tmp_path, settings):
    """Hundreds of streams (re)connecting together, as when the jobs they followed end: every one is
    answered, no request waits out the connection pool (a connection held across the wait for a
    worker thread made such bursts time out with 500s)."""
    import asyncio

    async def first_event(client: httpx.AsyncClient, job_id: str) -> int:
        async with client.stream("GET", f"/v1/jobs/{job_id}/events") as answer:
            async for line in answer.aiter_lines():
                if line.startswith("event:"):
                    return answer.status_code
            return answer.status_code

    async def burst(url: str, key: str, job_ids: list[str]) -> list:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=25,
                                     limits=httpx.Limits(max_connections=300)) as client:
            return await asyncio.gather(*(first_event(client, job_ids[i % len(job_ids)]) for i in range(200)),
                                        return_exceptions=True)

    with api_only(tmp_path, settings) as client:
        job_ids = [client.post("/v1/jobs", json=JOB).json()["id"] for _ in range(3)]
        key = client.headers["Authorization"].split()[1]
        answers = asyncio.run(burst(str(client.base_url), key, job_ids))  # each read has a 25 s deadline
        assert answers == [200] * 200, [a for a in answers if a != 200][:5]


@ON_SQLITE
def test_sigterm_ends_open_streams_with_a_final_event_and_the_api_exits(tmp_path, settings):
    """A service manager stops `erq api` while a client follows a job that will not end (no worker):
    the stream gets a final `closed` event and the process exits, instead of waiting for the job."""
    env = service_env(tmp_path, ERQ_DATABASE_URL=settings.database_url, ERQ_BROKER_URL=settings.broker_url)
    with api_process(["api"], env, tmp_path, tmp_path / "api.log") as (api, port):
        with api_client(port, make_key(settings, "alice")) as client:
            job_id = client.post("/v1/jobs", json=JOB).json()["id"]
            following = Following(client, job_id)
            following.start()
            following.wait_for_events(2)  # the current status and progress: the stream is open
            api.send_signal(signal.SIGTERM)
            following.join(30)
            assert following.events is not None, "the stream was not ended"
            assert api.wait(30) == 0, (tmp_path / "api.log").read_text()[-2000:]
    closed = following.events[-1]
    assert closed["event"] == "closed" and closed["data"]["reason"] == "shutdown", following.events
    assert closed["id"] == following.events[-2]["id"]  # resuming from it goes on where the stream stopped
    assert [e["data"]["status"] for e in following.events if e["event"] == "status"] == ["queued"]


@ON_SQLITE
def test_a_stream_ends_when_its_key_is_revoked(tmp_path, settings):
    """The hub re-checks its streams' keys every KEY_CHECK_SECONDS; a revoked key's stream ends with a
    `closed` event, while the same owner's stream opened with another key goes on."""
    from service.events import KEY_CHECK_SECONDS
    from storage.keys import PREFIX_LENGTH

    with api_only(tmp_path, settings) as client, \
            api_client(client.base_url.port, make_key(settings, "alice")) as other_client:
        job_id = client.post("/v1/jobs", json=JOB).json()["id"]
        doomed, kept = Following(client, job_id), Following(other_client, job_id)
        for following in (doomed, kept):
            following.start()
            following.wait_for_events(2)
        key = client.headers["Authorization"].split()[1]
        env = service_env(tmp_path, ERQ_DATABASE_URL=settings.database_url, ERQ_BROKER_URL=settings.broker_url)
        assert run_erq(["admin", "revoke-key", key[:PREFIX_LENGTH]], env, tmp_path).returncode == 0
        doomed.join(KEY_CHECK_SECONDS + 25)
        assert doomed.events is not None, "the stream of the revoked key did not end"
        assert kept.is_alive() and kept.events is None
        assert client.get(f"/v1/jobs/{job_id}").status_code == 401
        assert other_client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # the job did not end
        other_client.post(f"/v1/jobs/{job_id}/cancel")
        kept.join(30)
    assert doomed.events[-1]["event"] == "closed" and doomed.events[-1]["data"]["reason"] == "key_revoked"
    assert kept.events[-1]["event"] == "status" and kept.events[-1]["data"]["status"] == "cancelled"
