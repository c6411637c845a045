"""The sweeper: the service's background duties, run on the worker side, never in a request.

Each duty is a function run every few seconds: re-queue jobs whose worker went silent (lost
leases) and re-send the messages of orphaned queued jobs; with artifacts in S3, remove this host's
scratch folders of runs that cannot still be running. Every `erq worker` runs one sweeper
thread (with `--concurrency N`, its supervising process does); concurrent sweepers are safe
(rows are taken with SKIP LOCKED, duplicate messages are harmless). More duties are added to
`standard_duties`.

Each duty fails alone: an exception is logged and counted on the duty, and the other duties and the
health signal go on. After each round the sweeper touches ERQ_WORKER_HEALTH_FILE: the worker's
healthcheck (`erq worker --healthcheck`) reads its age.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from celery import Celery

from storage import jobs
from storage.artifacts import open_store
from storage.db import session_scope
from storage.models import db_now
from storage.settings import Settings
from worker.queue_repairs import OrphanedJobs, requeue_lost_jobs
from worker.webhook_delivery import WebhookDuty

SWEEP_SECONDS = 5
SCRATCH_SWEEP_SECONDS = 600
SCRATCH_GRACE_SECONDS = 3600  # beyond ERQ_MAX_JOB_SECONDS: no run of a job can be that old
log = logging.getLogger("erq.sweeper")


@dataclass
class Duty:
    name: str
    every_seconds: float
    run: Callable[[], object]
    last_run: float = float("-inf")
    ok: bool = True  # whether its last run succeeded
    failures: int = 0  # runs that raised, since the sweeper started


RETENTION_SWEEP_SECONDS = 60
WEBHOOK_SWEEP_SECONDS = 1


def standard_duties(app: Celery, settings: Settings) -> list[Duty]:
    orphans = OrphanedJobs(app, settings)
    duties = [Duty("lost leases", SWEEP_SECONDS, lambda: requeue_lost_jobs(app, settings)),
              Duty("orphaned jobs", SWEEP_SECONDS, orphans.reannounce)]
    if settings.s3_artifacts:  # the scratch folders of this host's runs, left by killed workers
        from storage.artifacts.s3 import remove_stale_scratch

        duties.append(Duty("stale scratch folders", SCRATCH_SWEEP_SECONDS, lambda: remove_stale_scratch(
            settings.scratch_dir, settings.max_job_seconds + SCRATCH_GRACE_SECONDS)))
    if settings.artifact_ttl_days is not None:
        duties.append(Duty("artifact retention", RETENTION_SWEEP_SECONDS, lambda: expire_artifacts(settings)))
    if settings.upload_ttl_days is not None:
        duties.append(Duty("upload retention", RETENTION_SWEEP_SECONDS, lambda: expire_uploads(settings)))
    if settings.webhook_allowed_hosts.strip():
        duties.append(Duty("webhooks", WEBHOOK_SWEEP_SECONDS, WebhookDuty(settings)))
    return duties


def expire_artifacts(settings: Settings) -> list[str]:
    """Remove the files of jobs that ended more than ERQ_ARTIFACT_TTL_DAYS ago; the jobs stay, with
    `artifacts_expired_at`. Returns the jobs whose files were removed."""
    expired = []
    store = open_store(settings)
    with session_scope(settings.database_url) as session:
        for job in jobs.jobs_past_retention(session, settings.artifact_ttl_days * 86400):
            try:
                store.remove_job(job.id)
            except OSError:
                log.warning("job %s: its expired artifacts could not be removed; retrying later", job.id,
                            exc_info=True)
                continue
            job.artifacts_expired_at = db_now()
            expired.append(job.id)
    if expired:
        log.info("removed the artifacts of %d job(s) past ERQ_ARTIFACT_TTL_DAYS=%s", len(expired),
                 settings.artifact_ttl_days)
    return expired


def expire_uploads(settings: Settings) -> list[str]:
    """Remove the uploads no job has named for ERQ_UPLOAD_TTL_DAYS (none in use by an active job)."""
    from storage.upload_store import open_upload_store
    from storage.uploads import expire

    removed = expire(settings.database_url, open_upload_store(settings), settings.upload_ttl_days * 86400)
    if removed:
        log.info("removed %d upload(s) unused for ERQ_UPLOAD_TTL_DAYS=%s", len(removed), settings.upload_ttl_days)
    return removed


class Sweeper(threading.Thread):
    def __init__(self, duties: list[Duty], health_file: Optional[Path] = None):
        super().__init__(daemon=True, name="sweeper")
        self.duties, self.health_file = duties, health_file
        self.stopping = threading.Event()

    def run_due(self) -> bool:
        """Run the duties that are due, each on its own: one that raises is logged and counted, and
        the others still run. True when the last run of every duty succeeded."""
        for duty in self.duties:
            if time.monotonic() - duty.last_run < duty.every_seconds:
                continue
            duty.last_run = time.monotonic()
            try:
                duty.run()
                duty.ok = True
            except Exception:
                duty.ok = False
                duty.failures += 1
                log.warning("sweeper duty %r failed (%d failure(s) so far)", duty.name, duty.failures, exc_info=True)
        return all(duty.ok for duty in self.duties)

    def touch_health_file(self) -> None:
        if self.health_file is None:
            return
        try:
            self.health_file.parent.mkdir(parents=True, exist_ok=True)
            self.health_file.touch()
        except OSError:
            log.warning("cannot write the worker health file %s", self.health_file, exc_info=True)

    def run(self) -> None:
        while True:
            self.run_due()
            self.touch_health_file()  # the sweeper is alive, whatever one duty's last run did
            if self.stopping.wait(1.0):
                return

    def stop(self) -> None:
        self.stopping.set()
