"""The job queue: the Celery client that both the API and the workers use (app factory, enqueue by
task name, the count of waiting messages). Its repairs (lost leases, orphaned jobs) are a worker's
duty: worker/queue_repairs.py.

Light on purpose: no torch, no engine, nothing of the worker package. The task itself lives in
worker/tasks.py under the name RUN_JOB_TASK.
"""
from __future__ import annotations

from celery import Celery

from storage.settings import Settings, get_settings

RUN_JOB_TASK = "erq.run_job"


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("erq", broker=settings.broker_url)
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
        # Timeouts: a Redis that hangs (rather than refusing connections) must not block the API's
        # POST or a worker's sweep forever.
        return {"visibility_timeout": settings.max_job_seconds + 600, "socket_connect_timeout": 5,
                "socket_timeout": 15}
    return {}  # the embedded SQLAlchemy transport passes its options to create_engine


def declare_queue(settings: Settings) -> None:
    """Create the job queue in an embedded broker once, at start-up, one process at a time: the
    SQLAlchemy transport creates its queue row on first use, and processes starting together
    (API and worker slots) would race to insert it, failing a submission or a worker's start."""
    if not settings.embedded_broker or "sqlite:///" not in settings.broker_url:
        return
    from storage.migrate import sqlite_file_lock

    with sqlite_file_lock(settings.broker_url):
        ready_messages(make_celery(settings), settings)


def enqueue(app: Celery, job_id: str) -> None:
    app.send_task(RUN_JOB_TASK, args=[job_id], retry=True,
                  retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5})


def ready_messages(app: Celery, settings: Settings) -> int:
    """Messages waiting in the job queue, not those a worker holds: one broker round trip, the same
    for Redis and the embedded SQLAlchemy transport. Raises when the broker is unreachable."""
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=3)
        return connection.default_channel.queue_declare(queue=settings.queue, passive=False).message_count
