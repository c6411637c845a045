"""A run's outcome, from what the engine did to the job's end: what an exception means
(`outcome_of`), storing the run's files before anything is recorded (a job whose results cannot be
stored fails, with its log if that can be stored), recording the end (retried while the database is
unreachable), or handing the job back to the queue."""
from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Callable, TypeVar

from celery import Celery
from sqlalchemy.exc import OperationalError

from erq_core.errors import CheckpointError, ConfigError, DatasetError, ErqError, ModelLoadError
from storage import jobs
from storage.artifacts import LOG_NAME, PUBLISHED, ArtifactStore, ArtifactStoreError, StoredFile
from storage.db import session_scope
from storage.models import JobStatus
from storage.outcomes import Reason, RunOutcome
from storage.queue import enqueue
from storage.settings import Settings
from worker.lease import JobCancelled, JobTimedOut, LeaseLost, WorkerShuttingDown

log = logging.getLogger("erq")
# A finished job's outcome is written again and again while the database is unreachable, this long at most.
OUTCOME_RETRY_SECONDS = 3600
T = TypeVar("T")


def error_code_of(exc: BaseException) -> str:
    """The stable `error_code` (docs/api.md, "Error codes") a failed job carries for `exc`."""
    for kind, code in ((JobTimedOut, "job_timed_out"), (ConfigError, "invalid_parameter"),
                       (DatasetError, "invalid_dataset"), (ModelLoadError, "model_load_failed"),
                       (CheckpointError, "invalid_checkpoint"), (ErqError, "engine_error"), (OSError, "storage_error")):
        if isinstance(exc, kind):
            return code
    return "internal_error"


def outcome_of(job_id: str, exc: BaseException) -> RunOutcome:
    """What a run that raised `exc` (the engine, or the lease's progress callback) comes to; logged."""
    if isinstance(exc, LeaseLost):
        log.warning("job %s was re-queued while this worker ran it (late heartbeat); stopping this run", job_id)
        return RunOutcome(Reason.LOST)
    if isinstance(exc, WorkerShuttingDown):
        log.info("job %s interrupted: its worker is shutting down; re-queued", job_id)
        return RunOutcome(Reason.HANDED_BACK)
    if isinstance(exc, JobCancelled):
        log.info("job %s cancelled", job_id)
        return RunOutcome(Reason.CANCELLED, jobs.CANCELLED, "cancelled")
    if isinstance(exc, (JobTimedOut, ErqError)):
        log.error("job %s failed: %s", job_id, exc)
        return RunOutcome.failed(str(exc), error_code_of(exc))
    if isinstance(exc, OSError):  # e.g. the artifact volume is full or read-only
        log.error("job %s failed: %s", job_id, exc)
        return RunOutcome.failed(f"storage error: {exc}", "storage_error")
    log.error("job %s failed with an internal error:\n%s", job_id, "".join(traceback.format_exception(exc)))
    return RunOutcome.failed(f"internal error: {type(exc).__name__}: {exc}", "internal_error")


def store_files(store: ArtifactStore, job_id: str, run: str, out: Path, status: JobStatus) -> list[StoredFile]:
    """Store the run's files that its outcome publishes (only the log unless it succeeded)."""
    return store.store_run(job_id, run, out, PUBLISHED if status == JobStatus.SUCCEEDED else (LOG_NAME,))


def store_outcome(store: ArtifactStore, job_id: str, run: str, out: Path,
                  outcome: RunOutcome) -> tuple[list[StoredFile], RunOutcome]:
    """Store and verify the run's files before its outcome is recorded: a job whose results cannot
    be stored fails with the reason, and publishes its log if that can be stored."""
    try:
        return store_files(store, job_id, run, out, outcome.status), outcome
    except (ArtifactStoreError, OSError) as exc:
        log.error("job %s: its files were not stored in %s: %s", job_id, store.describe(), exc)
        if outcome.reason != Reason.SUCCEEDED:
            return [], outcome  # its log alone could not be stored: the outcome stands
        failed = RunOutcome.failed(f"the job's files could not be stored in the artifact store: {exc}", "storage_error")
    try:
        return store_files(store, job_id, run, out, JobStatus.FAILED), failed
    except (ArtifactStoreError, OSError):
        return [], failed


def publish(store: ArtifactStore, settings: Settings, job_id: str, worker: str, attempt: int, run: str, out: Path,
            outcome: RunOutcome) -> None:
    """End the job with `outcome` (one that ends it): store the run's files, record the end, then
    tidy up (the workspace goes; a succeeded run removes the files of the runs it replaced)."""
    stored, outcome = store_outcome(store, job_id, run, out, outcome)
    recorded = with_database_retries(
        job_id, "the job's outcome", settings,
        lambda session: jobs.finish(session, job_id, outcome.status, outcome.error, outcome.metrics, worker=worker,
                                    attempt=attempt, run=run, stored=stored, error_code=outcome.error_code))
    store.release_workspace(job_id, run)
    if recorded and outcome.reason == Reason.SUCCEEDED:
        store.remove_other_runs(job_id, keep=run)


def fail_past_deadline(store: ArtifactStore, settings: Settings, job_id: str, worker: str, run: str, out: Path,
                       reason: str) -> None:
    """The hard time limit: fail the job with what of its log can be stored (its process exits next)."""
    try:
        stored = store_files(store, job_id, run, out, JobStatus.FAILED)
    except Exception:
        stored = []
    with session_scope(settings.database_url) as session:
        jobs.finish(session, job_id, JobStatus.FAILED, reason, worker=worker, run=run, stored=stored,
                    error_code="job_timed_out")


def hand_back(app: Celery, job_id: str, worker: str, settings: Settings) -> None:
    """The worker is shutting down: the job goes to the next worker now, not when its lease ends."""
    with session_scope(settings.database_url) as session:
        released = jobs.release(session, job_id, worker)
    if released:
        enqueue(app, job_id)  # this task's message is acked on return; the new one runs the job


def with_database_retries(job_id: str, what: str, settings: Settings, write: Callable[..., T]) -> T:
    """Run `write` in a session until the database takes it: a blip when a job ends must not throw
    away its result (the heartbeat keeps the lease meanwhile)."""
    delay, deadline = 0.5, time.monotonic() + OUTCOME_RETRY_SECONDS
    while True:
        try:
            with session_scope(settings.database_url) as session:
                return write(session)
        except OperationalError as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("job %s: cannot record %s yet, the database is unreachable (%s); retrying in %.1f s",
                        job_id, what, str(exc).splitlines()[0], delay, extra={"job_id": job_id})
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
