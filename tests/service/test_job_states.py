"""The job state machine in storage/jobs.py on SQLite and PostgreSQL: claims, releases, leases, cancels."""
from __future__ import annotations


from sqlalchemy import update

from storage import jobs
from storage.db import session_scope
from storage.keys import find_key
from storage.models import Job, db_now
from storage.outcomes import Reason
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import make_key

PARAMS = {"model": f"local-dir:{FIXTURE_MODEL_DIR}", "dataset": str(FIXTURE_DATASET)}


def new_job(settings) -> str:
    key = make_key(settings, "alice")
    with session_scope(settings.database_url) as session:
        return jobs.create_job(session, find_key(session, key).owner_id, dict(PARAMS), None).id


def state(settings, job_id: str) -> Job:
    with session_scope(settings.database_url) as session:
        return session.get(Job, job_id)


def test_a_job_released_by_a_stopping_worker_is_queued_again_without_spending_an_attempt(settings):
    job_id = new_job(settings)
    with session_scope(settings.database_url) as session:
        assert jobs.claim(session, job_id, "w1").attempts == 1
        assert not jobs.release(session, job_id, "someone-else")
        assert jobs.release(session, job_id, "w1")
    job = state(settings, job_id)
    assert (job.status, job.attempts, job.worker) == ("queued", 0, None)
    with session_scope(settings.database_url) as session:
        assert jobs.claim(session, job_id, "w2").attempts == 1


def test_a_cancel_that_crosses_a_release_ends_the_job_cancelled(settings):
    job_id = new_job(settings)
    with session_scope(settings.database_url) as session:
        jobs.claim(session, job_id, "w1")
        jobs.request_cancel(session, job_id)  # the job is running: only flagged
    assert state(settings, job_id).status == "running"
    with session_scope(settings.database_url) as session:
        assert not jobs.release(session, job_id, "w1")
    job = state(settings, job_id)
    assert job.status == "cancelled" and job.error == jobs.CANCELLED and job.finished_at is not None


def test_a_queued_job_flagged_for_cancel_is_cancelled_when_a_worker_picks_it_up(settings):
    job_id = new_job(settings)
    with session_scope(settings.database_url) as session:  # what a cancel racing a re-queue leaves behind
        session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    with session_scope(settings.database_url) as session:
        assert jobs.claim(session, job_id, "w1") is None
    assert state(settings, job_id).status == "cancelled"


def test_a_lost_worker_of_a_cancelled_job_ends_it_cancelled_not_requeued(settings):
    job_id = new_job(settings)
    with session_scope(settings.database_url) as session:
        jobs.claim(session, job_id, "w1")
        jobs.request_cancel(session, job_id)
        session.get(Job, job_id).heartbeat_at = db_now(-3600)
    with session_scope(settings.database_url) as session:
        assert jobs.expire_leases(session, lease_seconds=60, max_attempts=3) == []
    assert state(settings, job_id).status == "cancelled"


def test_cancelling_a_queued_job_means_no_worker_can_claim_it(settings):
    job_id = new_job(settings)
    with session_scope(settings.database_url) as session:
        jobs.request_cancel(session, job_id)
    with session_scope(settings.database_url) as session:
        assert jobs.claim(session, job_id, "w1") is None
    job = state(settings, job_id)
    assert job.status == "cancelled" and job.attempts == 0 and job.started_at is None


def test_a_worker_whose_lease_expired_can_neither_report_nor_finish_the_new_run(settings):
    job_id = new_job(settings)
    with session_scope(settings.database_url) as session:
        jobs.claim(session, job_id, "slow-w1")
        assert jobs.report_progress(session, job_id, "slow-w1", "aqer", 0.4) is None
        session.get(Job, job_id).heartbeat_at = db_now(-3600)
    with session_scope(settings.database_url) as session:
        assert jobs.expire_leases(session, lease_seconds=60, max_attempts=3) == [job_id]
    with session_scope(settings.database_url) as session:
        assert jobs.report_progress(session, job_id, "slow-w1", "wqer", 0.6) is Reason.LOST  # while queued
        jobs.claim(session, job_id, "w2")
        assert jobs.report_progress(session, job_id, "slow-w1", "wqer", 0.7) is Reason.LOST  # and once w2 runs it
        jobs.finish(session, job_id, "succeeded", metrics={"from": "slow-w1"}, worker="slow-w1")
    job = state(settings, job_id)
    assert (job.status, job.worker, job.stage, job.metrics) == ("running", "w2", "starting", None)
    with session_scope(settings.database_url) as session:
        jobs.request_cancel(session, job_id)
        assert jobs.report_progress(session, job_id, "w2", "aqer", 0.4) is Reason.CANCELLED
        jobs.finish(session, job_id, "cancelled", jobs.CANCELLED, worker="w2")
    assert state(settings, job_id).status == "cancelled"
