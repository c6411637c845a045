"""The one Celery task: run a job's ERQ pipeline, report progress, store the artifacts."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

from celery.signals import worker_shutting_down
from sqlalchemy.exc import OperationalError

from erq_core.progress import LAYERS_STAGE, RECONSTRUCT_STAGE
from storage import jobs
from storage.artifacts import LOG_NAME, PUBLISHED, ArtifactStore, ArtifactStoreError, StoredFile, open_store, run_name
from storage.db import session_scope
from storage.models import Job, JobStatus
from storage.queue import RUN_JOB_TASK, enqueue, make_celery
from storage.settings import Settings, get_settings
from worker.upload_cache import localized as localized_uploads

app = make_celery()
log = logging.getLogger("erq")
# Past ERQ_MAX_JOB_SECONDS plus this grace, a job that did not stop at a progress call is failed and
# its worker process exits (its supervisor restarts it): the hard time limit of the solo pool.
HARD_LIMIT_GRACE_SECONDS = 60
EXIT_HARD_TIME_LIMIT = 75
# A finished job's outcome is written again and again while the database is unreachable, this long at most.
OUTCOME_RETRY_SECONDS = 3600
shutting_down = threading.Event()
T = TypeVar("T")


@dataclass
class Engine:
    """What `erq worker` resolved at start: the device jobs run on."""

    device: Optional[str] = None  # None: the engine's choice (CUDA when there is one)


engine = Engine()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@worker_shutting_down.connect
def _on_worker_shutting_down(**_) -> None:
    """Ctrl-C / SIGTERM: the running job goes back to the queue now instead of waiting out its lease."""
    shutting_down.set()

# Share of the whole job each engine stage stands for, in order (for the 0..1 progress).
STAGE_WEIGHTS = {"load_model": 0.05, "evaluate_fp": 0.15, "calibrate_activations": 0.05,
                 "collect_statistics": 0.2, "aqer": 0.05, "calibrate_weights": 0.05, "wqer": 0.2,
                 "evaluate": 0.2, "save": 0.05, "evaluate_float64": 0.0, "export": 0.0,
                 "evaluate_onnx": 0.0}
# erq+ walks the blocks once (LAYERS_STAGE) instead of the four layer stages of erq: it stands for all
# four; its RECONSTRUCT_STAGE (--reconstruct) keeps the progress reached, its steps are within a block.
LAYER_STAGES = ("collect_statistics", "aqer", "calibrate_weights", "wqer")
PROGRESS_WRITE_SECONDS = 0.5


class JobCancelled(Exception):
    """The client cancelled the job while it ran."""


class JobTimedOut(Exception):
    """The job ran longer than ERQ_MAX_JOB_SECONDS."""


class LeaseLost(Exception):
    """The job was re-queued while this worker ran it (its heartbeat was late): another run owns it."""


class WorkerShuttingDown(Exception):
    """The worker was asked to stop while the job ran; the job is re-queued for another run."""


@app.task(name=RUN_JOB_TASK)
def run_job(job_id: str) -> None:
    execute_job(job_id, get_settings())


class ProgressReporter:
    """The engine's progress callback: writes stage and progress (throttled), stops on cancel or timeout.
    A database blip skips a write instead of failing the run."""

    def __init__(self, job_id: str, settings: Settings, worker: str):
        self.job_id, self.settings, self.worker = job_id, settings, worker
        self.started = time.monotonic()
        self.last_write = 0.0
        self.reached = 0.0  # the fraction of the job done, as of the last call

    def fraction(self, stage: str, done: int, total: int) -> float:
        share = done / total if total else 0.0
        before = 0.0
        for name, weight in STAGE_WEIGHTS.items():
            if stage == LAYERS_STAGE and name == LAYER_STAGES[0]:
                return min(1.0, before + sum(STAGE_WEIGHTS[s] for s in LAYER_STAGES) * share)
            if name == stage:
                return min(1.0, before + weight * share)
            before += weight
        return before

    def __call__(self, stage: str, done: int, total: int) -> None:
        if shutting_down.is_set():
            raise WorkerShuttingDown()
        now = time.monotonic()
        if now - self.started > self.settings.max_job_seconds:
            raise JobTimedOut(f"the job ran longer than ERQ_MAX_JOB_SECONDS={self.settings.max_job_seconds}")
        if stage != RECONSTRUCT_STAGE:
            self.reached = self.fraction(stage, done, total)
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
        if stop == "cancelled":
            raise JobCancelled()
        if stop == "lost":
            raise LeaseLost()


class Heartbeat(threading.Thread):
    """Renews the job's lease while the pipeline runs (even inside a long stage) and until its outcome
    is written, makes the log so far readable from the store, and enforces the hard time limit: a job
    still running well past ERQ_MAX_JOB_SECONDS is failed and its process exits."""

    def __init__(self, job_id: str, settings: Settings, store: ArtifactStore, run: str, out: Path, worker: str):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.job_id, self.settings, self.store, self.job_run, self.out, self.worker = (
            job_id, settings, store, run, out, worker)
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
            try:
                stored = _store_files(self.store, self.job_id, self.job_run, self.out, JobStatus.FAILED)
            except Exception:
                stored = []
            with session_scope(self.settings.database_url) as session:
                jobs.finish(session, self.job_id, JobStatus.FAILED, reason, worker=self.worker, run=self.job_run,
                            stored=stored, error_code="job_timed_out")
        finally:
            logging.shutdown()
            os._exit(EXIT_HARD_TIME_LIMIT)


def execute_job(job_id: str, settings: Settings) -> None:
    worker = worker_name()
    with session_scope(settings.database_url) as session:
        job = jobs.claim(session, job_id, worker)
        if job is None:
            _explain_unclaimed(session, job_id, settings)
            return  # cancelled, finished, or already taken by another worker: nothing to do
        params, attempt = dict(job.params), job.attempts
    store = _artifact_store(settings)
    run = run_name(attempt)
    out = store.workspace(job_id, run)
    heartbeat = Heartbeat(job_id, settings, store, run, out, worker)
    heartbeat.start()
    try:
        try:
            store.fresh_workspace(job_id, run)
            with _job_log(out, job_id):
                status, error, metrics, code = _run_pipeline(job_id, params, out, settings, worker)
        except OSError as exc:  # the artifact volume is full, read-only or gone
            status, error, metrics, code = (JobStatus.FAILED, f"cannot write the job's files in {out}: {exc}", None,
                                            "storage_error")
        except Exception as exc:  # never leave the job running until its lease expires
            log.exception("job %s: the worker failed around the pipeline", job_id)
            status, error, metrics, code = (JobStatus.FAILED, f"internal error in the worker: {type(exc).__name__}: "
                                            f"{exc}", None, "internal_error")
        if status in ("lost", JobStatus.QUEUED):
            store.release_workspace(job_id, run)
            if status == JobStatus.QUEUED:  # the worker is shutting down: hand the job to the next worker now
                _hand_back(job_id, worker, settings)
            return  # lost: the job is another run's now, that run records the outcome
        heartbeat.stop_log_sync()  # from here on only the final log is stored
        stored, (status, error, metrics, code) = _store_outcome(store, job_id, run, out, (status, error, metrics, code))
        recorded = _with_database_retries(
            job_id, "the job's outcome", settings,
            lambda session: jobs.finish(session, job_id, status, error, metrics, worker=worker, attempt=attempt,
                                        run=run, stored=stored, error_code=code))
        store.release_workspace(job_id, run)
        if recorded and status == JobStatus.SUCCEEDED:
            store.remove_other_runs(job_id, keep=run)
    finally:
        heartbeat.stopped.set()


_stores: dict[str, ArtifactStore] = {}


def _artifact_store(settings: Settings) -> ArtifactStore:
    """One store per process and settings: an S3 client is costly to make and safe to share."""
    key = settings.model_dump_json()
    if key not in _stores:
        _stores[key] = open_store(settings)
    return _stores[key]


def _store_files(store: ArtifactStore, job_id: str, run: str, out: Path, status: JobStatus) -> list[StoredFile]:
    """Store the run's files that its outcome publishes (only the log unless it succeeded)."""
    return store.store_run(job_id, run, out, PUBLISHED if status == JobStatus.SUCCEEDED else (LOG_NAME,))


def _store_outcome(store: ArtifactStore, job_id: str, run: str, out: Path,
                   outcome: tuple) -> tuple[list[StoredFile], tuple]:
    """Store and verify the run's files before its outcome is recorded: a job whose results cannot
    be stored fails with the reason, and publishes its log if that can be stored."""
    status = outcome[0]
    try:
        return _store_files(store, job_id, run, out, status), outcome
    except (ArtifactStoreError, OSError) as exc:
        log.error("job %s: its files were not stored in %s: %s", job_id, store.describe(), exc)
        if status != JobStatus.SUCCEEDED:
            return [], outcome  # its log alone could not be stored: the outcome stands
        failed = (JobStatus.FAILED, f"the job's files could not be stored in the artifact store: {exc}", None,
                  "storage_error")
    try:
        return _store_files(store, job_id, run, out, JobStatus.FAILED), failed
    except (ArtifactStoreError, OSError):
        return [], failed


def _explain_unclaimed(session, job_id: str, settings: Settings) -> None:
    if session.get(Job, job_id) is None:
        log.error("job %s is not in this worker's database (%s): is another erq service sharing the broker %s? "
                  "Give each service its own ERQ_HOME (or ERQ_BROKER_URL); the message is dropped",
                  job_id, _without_password(settings.database_url), _without_password(settings.broker_url))


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url.removeprefix("sqla+")).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _hand_back(job_id: str, worker: str, settings: Settings) -> None:
    with session_scope(settings.database_url) as session:
        released = jobs.release(session, job_id, worker)
    if released:
        enqueue(app, job_id)  # this task's message is acked on return; the new one runs the job


def _with_database_retries(job_id: str, what: str, settings: Settings, write: Callable[..., T]) -> T:
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


class _OneJobOnly(logging.Filter):
    """Passes the records of one job: those logged by the thread that runs it (and by the data-loader
    processes it forks), or tagged with its id; not those of the sweeper or another job."""

    def __init__(self, job_id: str):
        super().__init__()
        self.job_id, self.thread = job_id, threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        tagged = getattr(record, "job_id", None)
        return tagged == self.job_id if tagged is not None else record.thread == self.thread


@contextmanager
def _job_log(out: Path, job_id: str) -> Iterator[None]:
    """This job's engine and worker log lines go to out/job.log as well."""
    handler = logging.FileHandler(out / LOG_NAME)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(_OneJobOnly(job_id))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


def error_code_of(exc: BaseException) -> str:
    """The stable `error_code` (README, "Error codes") a failed job carries for `exc`."""
    from erq_core.errors import CheckpointError, ConfigError, DatasetError, ErqError, ModelLoadError

    for kind, code in ((JobTimedOut, "job_timed_out"), (ConfigError, "invalid_parameter"),
                       (DatasetError, "invalid_dataset"), (ModelLoadError, "model_load_failed"),
                       (CheckpointError, "invalid_checkpoint"), (ErqError, "engine_error"), (OSError, "storage_error")):
        if isinstance(exc, kind):
            return code
    return "internal_error"


def _run_pipeline(job_id: str, params: dict, out: Path, settings: Settings,
                  worker: str) -> tuple[str, str | None, dict | None, str | None]:
    """(status, error, metrics, error_code) of one run."""
    import erq_core

    log.info("job %s on %s: %s", job_id, worker, params)
    workers = settings.loader_workers
    log.info("data loaders: %s", f"{workers} worker processes" if workers is not None
             else "the engine's default (4 worker processes on a GPU, none on the CPU)")
    try:
        with localized_uploads(job_id, params, settings) as local:  # dataset:ID, upload:ID -> this host's cache
            config = erq_core.ErqConfig.from_dict(local)
            metrics = erq_core.run(config, out, progress=ProgressReporter(job_id, settings, worker),
                                   device=engine.device, loader_workers=workers)
    except LeaseLost:
        log.warning("job %s was re-queued while this worker ran it (late heartbeat); stopping this run", job_id)
        return "lost", None, None, None
    except WorkerShuttingDown:
        log.info("job %s interrupted: its worker is shutting down; re-queued", job_id)
        return JobStatus.QUEUED, None, None, None
    except JobCancelled:
        log.info("job %s cancelled", job_id)
        return JobStatus.CANCELLED, jobs.CANCELLED, None, "cancelled"
    except (JobTimedOut, erq_core.ErqError) as exc:
        log.error("job %s failed: %s", job_id, exc)
        return JobStatus.FAILED, str(exc), None, error_code_of(exc)
    except OSError as exc:  # e.g. the artifact volume is full or read-only
        log.error("job %s failed: %s", job_id, exc)
        return JobStatus.FAILED, f"storage error: {exc}", None, "storage_error"
    except Exception as exc:
        log.error("job %s failed with an internal error:\n%s", job_id, traceback.format_exc())
        return JobStatus.FAILED, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error"
    log.info("job %s succeeded: top-1 %s", job_id, metrics["quantized"]["top1"])
    return JobStatus.SUCCEEDED, None, metrics, None
