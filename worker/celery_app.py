"""The Celery application. Light: the API imports it to enqueue by task name, without torch."""
from __future__ import annotations

from celery import Celery

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
        broker_connection_retry_on_startup=True,
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
