"""A run's lease on its job, held by the worker while the engine runs: the progress callback (writes
stage and progress, stops the run on cancel, lost lease, shutdown or time limit) and the heartbeat
thread (renews the lease, copies the log so far to the store, enforces the hard time limit)."""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from celery.signals import worker_shutting_down
from sqlalchemy.exc import OperationalError

from erq_core.progress import RECONSTRUCT_STAGE, run_fraction
from storage import jobs
from storage.artifacts import ArtifactStore
from storage.db import session_scope
from storage.outcomes import Reason
from storage.settings import Settings

log = logging.getLogger("erq")
# Past ERQ_MAX_JOB_SECONDS plus this grace, a job that did not stop at a progress call is failed and
# its worker process exits (its supervisor restarts it): the hard time limit of the solo pool.
HARD_LIMIT_GRACE_SECONDS = 60
EXIT_HARD_TIME_LIMIT = 75
PROGRESS_WRITE_SECONDS = 0.5
shutting_down = threading.Event()


@worker_shutting_down.connect
def _on_worker_shutting_down(**_) -> None:
    """Ctrl-C / SIGTERM: the running job goes back to the queue now instead of waiting out its lease."""
    shutting_down.set()


class JobCancelled(Exception):
    """The client cancelled the job while it ran."""


class JobTimedOut(Exception):
    """The job ran longer than ERQ_MAX_JOB_SECONDS."""


class LeaseLost(Exception):
    """The job was re-queued while this worker ran it (its heartbeat was late): another run owns it."""


class WorkerShuttingDown(Exception):
    """The worker was asked to stop while the job ran; the job is re-queued for another run."""


class ProgressReporter:
    """The engine's progress callback: writes stage and progress (throttled), stops on cancel or timeout.
    A database blip skips a write instead of failing the run."""

    def __init__(self, job_id: str, settings: Settings, worker: str):
        self.job_id, self.settings, self.worker = job_id, settings, worker
        self.started = time.monotonic()
        self.last_write = 0.0
        self.reached = 0.0  # the fraction of the job done, as of the last call

    def __call__(self, stage: str, done: int, total: int) -> None:
        if shutting_down.is_set():
            raise WorkerShuttingDown()
        now = time.monotonic()
        if now - self.started > self.settings.max_job_seconds:
            raise JobTimedOut(f"the job ran longer than ERQ_MAX_JOB_SECONDS={self.settings.max_job_seconds}")
        if stage != RECONSTRUCT_STAGE:  # its steps are within a block: the progress reached stands
            self.reached = run_fraction(stage, done, total)
        if now - self.last_write < PROGRESS_WRITE_SECONDS:  # stages change per layer: throttle on time alone
            return
        self.last_write = now
        try:
            with session_scope(self.settings.database_url) as session:
                stop = jobs.report_progress(session, self.job_id, self.worker, stage, self.reached)
        except OperationalError as exc:
            log.warning("job %s: progress not recorded, the database is unreachable (%s)", self.job_id,
                        str(exc).splitlines()[0])
            return
        if stop == Reason.CANCELLED:
            raise JobCancelled()
        if stop == Reason.LOST:
            raise LeaseLost()


class Heartbeat(threading.Thread):
    """Renews the job's lease while the pipeline runs (even inside a long stage) and until its outcome
    is written, makes the log so far readable from the store, and enforces the hard time limit: a job
    still running well past ERQ_MAX_JOB_SECONDS is ended by `past_deadline(reason)` (it records the
    failure) and its process exits."""

    def __init__(self, job_id: str, settings: Settings, store: ArtifactStore, run: str, out: Path, worker: str,
                 past_deadline: Callable[[str], None]):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.job_id, self.settings, self.store, self.job_run, self.out, self.worker = (
            job_id, settings, store, run, out, worker)
        self.past_deadline = past_deadline
        self.deadline = time.monotonic() + settings.max_job_seconds + HARD_LIMIT_GRACE_SECONDS
        self.stopped = threading.Event()
        self.log_lock, self.log_sync = threading.Lock(), True

    def stop_log_sync(self) -> None:
        """No copy of the log so far may overwrite the final log once the run stores it."""
        with self.log_lock:
            self.log_sync = False

    def run(self) -> None:
        interval = max(1.0, min(self.settings.lease_seconds / 4, HARD_LIMIT_GRACE_SECONDS / 2))
        while not self.stopped.wait(interval):
            if time.monotonic() > self.deadline:
                self.fail_and_exit()
            try:
                with session_scope(self.settings.database_url) as session:
                    jobs.heartbeat(session, self.job_id, self.worker)
            except Exception:  # a database hiccup must not kill the job; the next beat retries
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True, extra={"job_id": self.job_id})
            try:
                with self.log_lock:
                    if self.log_sync:
                        self.store.sync_log(self.job_id, self.job_run, self.out)
            except Exception as exc:  # the log reaches the store with the results in any case
                log.warning("job %s: the log so far was not copied to the artifact store (%s)", self.job_id, exc,
                            extra={"job_id": self.job_id})

    def fail_and_exit(self) -> None:
        reason = (f"the job ran longer than ERQ_MAX_JOB_SECONDS={self.settings.max_job_seconds} and did not stop; "
                  "its worker process was ended")
        log.error("job %s: %s", self.job_id, reason, extra={"job_id": self.job_id})
        try:
            self.stop_log_sync()
            self.past_deadline(reason)
        finally:
            logging.shutdown()
            os._exit(EXIT_HARD_TIME_LIMIT)
