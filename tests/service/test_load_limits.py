"""Load one caller can put on everyone: /metrics costs the same with 10 or 1,000 jobs and can be
restricted; an exhausted connection pool answers 503; per-owner request rate and event streams
answer 429. Real app, real databases, a real `erq api` process for the streams."""
from __future__ import annotations

import datetime as dt
import re
import time
from contextlib import contextmanager

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import event, insert, select
from sqlalchemy.engine import Engine

from service.app import create_app
from service.metrics import DURATION_BUCKETS
from storage.db import engine_for, session_scope
from storage.models import Job, JobStatus, Owner
from tests.service.conftest import ON_SQLITE, make_key, service_env
from tests.service.processes import api_client, api_process
from tests.service.test_api import JOB

START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def add_jobs(settings, count: int, first: int = 0) -> list[float]:
    """`count` jobs of one owner straight into the table, a quarter of each status but running, with
    run times of a few seconds to a few hours; returns the run times of the succeeded ones."""
    statuses = [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.QUEUED, JobStatus.SUCCEEDED]
    rows, durations = [], []
    with session_scope(settings.database_url) as session:
        owner = session.scalar(select(Owner.id).limit(1))
        for i in range(first, first + count):
            status, seconds = statuses[i % 4], 7.5 * (i % 997) + 0.25
            ended = status != JobStatus.QUEUED
            rows.append({"id": f"job{i:07d}", "owner_id": owner, "params": {}, "status": status, "progress": 0.0,
                         "cancel_requested": False, "attempts": 1 if ended else 0, "created_at": START,
                         "started_at": START if ended else None,
                         "finished_at": START + dt.timedelta(seconds=seconds) if ended else None})
            if status == JobStatus.SUCCEEDED:
                durations.append(seconds)
        session.execute(insert(Job), rows)
    return durations


@contextmanager
def statements():
    """The SQL statements (with their parameters) this process runs while the block runs."""
    seen: list[tuple[str, object]] = []
    record = lambda conn, cursor, statement, parameters, *rest: seen.append((statement, parameters))  # noqa: E731
    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def rows_returned(settings, recorded: list[tuple[str, object]]) -> list[int]:
    """How many rows each recorded statement returns, run again on the database as it is now."""
    connection = engine_for(settings.database_url).raw_connection()
    try:
        counts = []
        for statement, parameters in recorded:
            cursor = connection.cursor()
            cursor.execute(statement, parameters)
            counts.append(len(cursor.fetchall()))
            cursor.close()
        return counts
    finally:
        connection.close()


def scrape(settings, headers=None) -> tuple[str, list[tuple[str, object]]]:
    with TestClient(create_app(settings.model_copy(update={"metrics_cache_seconds": 0}))) as client, \
            statements() as seen:
        answer = client.get("/metrics", headers=headers or {})
        assert answer.status_code == 200, answer.text
        return answer.text, list(seen)


def figure(text: str, name: str) -> float:
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def test_a_scrape_runs_the_same_statements_with_10_or_1000_jobs_and_counts_right(settings):
    make_key(settings, "owner")
    durations = add_jobs(settings, 10)
    _, few = scrape(settings)
    durations += add_jobs(settings, 990, first=10)
    text, many = scrape(settings)
    assert few == many and len(many) == 2  # the same two statements, whatever the number of jobs
    assert max(rows_returned(settings, many)) <= len(JobStatus)  # each returns a row per status at most
    assert figure(text, 'erq_jobs{status="succeeded"}') == 500 and figure(text, 'erq_jobs{status="queued"}') == 250
    assert figure(text, "erq_queue_depth") == 250
    assert figure(text, "erq_job_duration_seconds_count") == len(durations) == 500
    assert figure(text, "erq_job_duration_seconds_sum") == pytest.approx(sum(durations), rel=1e-6)
    for bound in DURATION_BUCKETS:
        expected = sum(d <= bound for d in durations)
        assert figure(text, f'erq_job_duration_seconds_bucket{{le="{bound}"}}') == expected, bound


@ON_SQLITE
def test_scrapes_within_the_cache_period_read_the_database_once(settings):
    make_key(settings, "owner")
    add_jobs(settings, 8)
    app = create_app(settings.model_copy(update={"metrics_cache_seconds": 3600}))
    with TestClient(app) as client, statements() as seen:
        texts = [client.get("/metrics").text for _ in range(20)]
        assert app.state.job_figures.reads == 1 and len(seen) == 2
        assert all(figure(text, 'erq_jobs{status="succeeded"}') == 4 for text in texts)


@ON_SQLITE
def test_metrics_can_need_a_token_or_be_off(settings):
    with TestClient(create_app(settings.model_copy(update={"metrics_token": SecretStr("scrape-me")}))) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic scrape-me"}):
            answer = client.get("/metrics", headers=headers)
            assert answer.status_code == 401 and answer.json()["code"] == "invalid_metrics_token", headers
            assert answer.headers["WWW-Authenticate"] == "Bearer"
        answer = client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert answer.status_code == 200 and "erq_jobs" in answer.text
    with TestClient(create_app(settings.model_copy(update={"metrics": "off"}))) as client:
        answer = client.get("/metrics")
        assert answer.status_code == 404 and "ERQ_METRICS" in answer.json()["detail"]
        assert client.get("/healthz").status_code == 200


def test_an_exhausted_connection_pool_answers_503_with_retry_after(settings, alice):
    one = settings.model_copy(update={"database_pool_size": 1, "database_pool_overflow": 0,
                                      "database_pool_timeout_seconds": 0.2, "metrics_cache_seconds": 0})
    with TestClient(create_app(one)) as client:
        assert client.get("/v1/jobs", headers=alice).status_code == 200
        with engine_for(one.database_url, one.database_pool).connect():  # the pool's one connection, held
            for path in ("/v1/jobs", "/metrics"):
                answer = client.get(path, headers=alice)
                assert answer.status_code == 503, (path, answer.status_code, answer.text)
                assert answer.json()["code"] == "database_busy" and int(answer.headers["Retry-After"]) > 0
        assert client.get("/v1/jobs", headers=alice).status_code == 200


@ON_SQLITE
def test_an_owner_past_its_request_rate_gets_429_and_others_do_not(settings, alice, bob):
    slow = settings.model_copy(update={"owner_requests_per_second": 0.01, "owner_request_burst": 3})
    with TestClient(create_app(slow)) as client:
        assert [client.get("/v1/jobs", headers=alice).status_code for _ in range(3)] == [200, 200, 200]
        answer = client.get("/v1/jobs", headers=alice)
        assert answer.status_code == 429 and answer.headers["content-type"].startswith("application/problem+json")
        body = answer.json()
        assert body["code"] == "too_many_requests" and body["limit"] == 0.01 and "ERQ_OWNER_REQUESTS_PER_SECOND" \
            in body["detail"]
        assert 1 <= int(answer.headers["Retry-After"]) <= 100
        assert client.get("/v1/jobs", headers=bob).status_code == 200  # another owner is not slowed
        assert client.get("/healthz").status_code == 200


def open_stream(client: httpx.Client, job_id: str):
    """An event stream that has started (its first line read), still open: (its context, the answer,
    its lines, which must stay referenced: a line iterator that is collected closes the stream)."""
    context = client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=30)
    answer = context.__enter__()
    lines = answer.iter_lines()
    if answer.status_code == 200:
        next(lines)
    else:
        answer.read()
    return context, answer, lines


@ON_SQLITE
@pytest.mark.integration
def test_an_owner_past_its_open_event_streams_gets_429_until_one_closes(tmp_path, settings):
    env = service_env(tmp_path, ERQ_DATABASE_URL=settings.database_url, ERQ_BROKER_URL=settings.broker_url,
                      ERQ_MAX_EVENT_STREAMS_PER_OWNER="2")
    with api_process(["api"], env, tmp_path, tmp_path / "api.log") as (api, port):
        with api_client(port, make_key(settings, "alice")) as alice, api_client(port, make_key(settings, "bob")) as bob:
            job_id = alice.post("/v1/jobs", json=JOB).json()["id"]
            bobs_job = bob.post("/v1/jobs", json=JOB).json()["id"]
            streams = [open_stream(alice, job_id) for _ in range(2)]
            assert [answer.status_code for _, answer, _ in streams] == [200, 200]
            context, refused, _ = open_stream(alice, job_id)
            context.__exit__(None, None, None)
            assert refused.status_code == 429 and refused.json()["code"] == "too_many_event_streams"
            assert refused.json()["limit"] == 2 and int(refused.headers["Retry-After"]) > 0
            context, other, _ = open_stream(bob, bobs_job)
            assert other.status_code == 200  # another owner's streams are its own
            context.__exit__(None, None, None)
            streams.pop()[0].__exit__(None, None, None)
            deadline = time.monotonic() + 30  # the server notices the client has gone
            while True:
                context, again, _ = open_stream(alice, job_id)
                context.__exit__(None, None, None)
                if again.status_code == 200:
                    break
                assert again.status_code == 429 and time.monotonic() < deadline
                time.sleep(0.2)
            streams[0][0].__exit__(None, None, None)


def test_the_request_rate_refills_at_its_rate_and_each_owner_has_its_own():
    from service.guards import OwnerRequestRate

    rate = OwnerRequestRate(rate=2, burst=2)
    assert [rate.take(1), rate.take(1)] == [None, None]  # the burst
    wait = rate.take(1)
    assert wait is not None and 0 < wait <= 0.5  # one request's worth at 2 a second
    tokens, then = rate.buckets[1]
    rate.buckets[1] = (tokens, then - wait)  # as if the owner waited Retry-After
    assert rate.take(1) is None and rate.take(1) is not None
    assert rate.take(2) is None
    assert OwnerRequestRate(rate=0, burst=1).take(1) is None  # 0: no limit
