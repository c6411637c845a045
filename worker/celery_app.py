"""The Celery application. Light: the API imports it to enqueue by task name, without torch."""
from __future__ import annotations

import logging

from celery import Celery

from storage import jobs
from storage.db import session_scope
from storage.settings import Settings, get_settings

RUN_JOB_TASK = "erq.run_job"
LEASE_SWEEP_SECONDS = 5


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("erq", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_ignore_result=True,  # job state lives in our database, not in a result backend
        task_time_limit=settings.max_job_seconds + 300,
        task_soft_time_limit=settings.max_job_seconds,
        broker_transport_options=_transport_options(settings),
        # A broker that restarts or is away for a while must not end the worker (Celery gives up
        # after 100 tries by default) nor the job it runs: jobs and their state live in the database.
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def _transport_options(settings: Settings) -> dict:
    if settings.broker_url.startswith(("redis", "rediss", "sentinel")):
        # Redis hands an unacked task out again after this long: keep it above the longest job.
        return {"visibility_timeout": settings.max_job_seconds + 600}
    return {}  # the embedded SQLAlchemy transport passes its options to create_engine


def enqueue(app: Celery, job_id: str) -> None:
    app.send_task(RUN_JOB_TASK, args=[job_id], retry=True,
                  retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5})


def requeue_lost_jobs(app: Celery, settings: Settings) -> list[str]:
    """Re-queue (or fail) running jobs whose worker stopped sending heartbeats.

    Run by a sweeper thread in every worker and, throttled, by the API when a client reads jobs, so
    a job never stays `running` after its worker is gone, even while no worker is up.
    """
    with session_scope(settings.database_url) as session:
        requeued = jobs.expire_leases(session, settings.lease_seconds, settings.max_attempts)
    for job_id in requeued:
        logging.getLogger("erq").warning("job %s lost its worker; re-queued", job_id)
        try:
            enqueue(app, job_id)
        except Exception as exc:  # never leave a queued job without a message behind it
            with session_scope(settings.database_url) as session:
                jobs.finish(session, job_id, "failed", f"its worker was lost and the job could not be re-queued: "
                                                       f"broker unreachable ({exc})")
    return requeued
