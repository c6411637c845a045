"""The job queue: the Celery client that both the API and the workers use (app factory, enqueue by
task name) and the queue's own repairs (lost leases, orphaned jobs), which the sweeper runs.

Light on purpose: no torch, no engine, nothing of the worker package. The task itself lives in
worker/tasks.py under the name RUN_JOB_TASK.
"""
from __future__ import annotations

import logging

from celery import Celery

from storage import jobs
from storage.db import session_scope
from storage.settings import Settings, get_settings

RUN_JOB_TASK = "erq.run_job"
# A queued job younger than this may still be on its way to the broker (the API commits the job,
# then sends its message): the orphan sweep leaves it alone.
ORPHAN_GRACE_SECONDS = 30
log = logging.getLogger("erq")


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


def requeue_lost_jobs(app: Celery, settings: Settings) -> list[str]:
    """Re-queue (or fail) running jobs whose worker stopped sending heartbeats (a sweeper duty)."""
    with session_scope(settings.database_url) as session:
        requeued = jobs.expire_leases(session, settings.lease_seconds, settings.max_attempts)
    for job_id in requeued:
        log.warning("job %s lost its worker; re-queued", job_id)
        try:
            enqueue(app, job_id)
        except Exception as exc:  # the job stays queued: the orphan sweep sends it once the broker is back
            log.warning("job %s re-queued, but its message could not be sent yet (%s)", job_id, exc)
    return requeued


def ready_messages(app: Celery, settings: Settings) -> int:
    """Messages waiting in the job queue, not those a worker holds: one broker round trip, the same
    for Redis and the embedded SQLAlchemy transport. Raises when the broker is unreachable."""
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=3)
        return connection.default_channel.queue_declare(queue=settings.queue, passive=False).message_count


class OrphanedJobs:
    """Finds queued jobs that no broker message will ever start, and sends their message again.

    A job stays `queued` with no message behind it when the API dies between committing the job and
    sending its message, or when Redis restarts without persistence. Each sweep (`reannounce`, run by
    every worker's sweeper) reads the number of messages waiting in the queue, then the number of jobs
    queued for more than ORPHAN_GRACE_SECONDS: fewer messages than jobs means some messages are gone.
    Which ones cannot be told, so every such job is sent again; the extra messages are harmless,
    since `jobs.claim` is atomic: a message for a job that is already running or ended does nothing.

    Races, and why they do no harm:
    - A job the API has committed but not sent yet is younger than the grace: not counted.
    - A message a worker has taken whose claim is not committed yet, or a job a lease sweep has
      re-queued but not sent yet: the job counts and its message does not, for milliseconds. So a
      shortfall is acted on only when two sweeps in a row (a few seconds apart) see one.
    - Messages are counted before jobs: a job claimed in between lowers the job count, never
      raises it.
    - Messages of younger jobs count too, so a loss shows only once they have run or aged past
      the grace: recovery can be late, a job never runs twice.
    - Several workers may find the same shortfall and each send the messages: more duplicates,
      still harmless, and the next sweeps see enough messages.
    A broker that is down skips the sweep (logged); the sweeps after it comes back recover.
    """

    def __init__(self, app: Celery, settings: Settings):
        self.app, self.settings = app, settings
        self.short_last_sweep = False

    def reannounce(self) -> list[str]:
        """One sweep; returns the jobs whose message was sent again."""
        try:
            waiting = ready_messages(self.app, self.settings)
        except Exception as exc:
            self.short_last_sweep = False
            log.warning("orphaned-job sweep skipped: the broker is unreachable (%s)", exc)
            return []
        with session_scope(self.settings.database_url) as session:
            queued = jobs.queued_longer_than(session, ORPHAN_GRACE_SECONDS)
        short = waiting < queued
        confirmed = short and self.short_last_sweep
        self.short_last_sweep = short and not confirmed  # after acting, wait for two short sweeps again
        if not confirmed:
            return []
        with session_scope(self.settings.database_url) as session:
            orphans = jobs.queued_ids_longer_than(session, ORPHAN_GRACE_SECONDS)
        log.warning("%d job(s) queued for over %d s but only %d message(s) in the broker queue: "
                    "sending the messages of all %d again", queued, ORPHAN_GRACE_SECONDS, waiting, len(orphans))
        sent = []
        try:
            for job_id in orphans:
                enqueue(self.app, job_id)
                sent.append(job_id)
        except Exception as exc:  # the others stay queued: a later sweep sends them
            log.warning("re-sending the messages of queued jobs failed after %d of %d: the broker is unreachable "
                        "(%s)", len(sent), len(orphans), exc)
        return sent
