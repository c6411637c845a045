"""The one Celery task: run a job's ERQ pipeline, report progress, store the artifacts."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from celery.signals import worker_shutting_down

from storage import jobs
from storage.artifacts import ArtifactStore
from storage.db import session_scope
from storage.settings import Settings, get_settings
from worker.celery_app import RUN_JOB_TASK, enqueue, make_celery

app = make_celery()
log = logging.getLogger("erq")
# Past ERQ_MAX_JOB_SECONDS plus this grace, a job that did not stop at a progress call is failed and
# its worker process exits (its supervisor restarts it): the hard time limit of the solo pool.
HARD_LIMIT_GRACE_SECONDS = 60
EXIT_HARD_TIME_LIMIT = 75
shutting_down = threading.Event()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"  # read at each job: prefork children have their own pid


@worker_shutting_down.connect
def _on_worker_shutting_down(**_) -> None:
    """Ctrl-C / SIGTERM: the running job goes back to the queue now instead of waiting out its lease."""
    shutting_down.set()

# Share of the whole job each engine stage stands for, in order (for the 0..1 progress).
STAGE_WEIGHTS = {"load_model": 0.05, "evaluate_fp": 0.15, "calibrate_activations": 0.05,
                 "collect_statistics": 0.2, "aqer": 0.05, "calibrate_weights": 0.05, "wqer": 0.2,
                 "evaluate": 0.2, "save": 0.05}
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
    """The engine's progress callback: writes stage and progress (throttled), stops on cancel or timeout."""

    def __init__(self, job_id: str, settings: Settings, worker: str):
        self.job_id, self.settings, self.worker = job_id, settings, worker
        self.started = time.monotonic()
        self.last_write = 0.0

    def fraction(self, stage: str, done: int, total: int) -> float:
        before = 0.0
        for name, weight in STAGE_WEIGHTS.items():
            if name == stage:
                return min(1.0, before + weight * (done / total if total else 0.0))
            before += weight
        return before

    def __call__(self, stage: str, done: int, total: int) -> None:
        if shutting_down.is_set():
            raise WorkerShuttingDown()
        now = time.monotonic()
        if now - self.started > self.settings.max_job_seconds:
            raise JobTimedOut(f"the job ran longer than ERQ_MAX_JOB_SECONDS={self.settings.max_job_seconds}")
        if now - self.last_write < PROGRESS_WRITE_SECONDS:  # stages change per layer: throttle on time alone
            return
        self.last_write = now
        with session_scope(self.settings.database_url) as session:
            stop = jobs.report_progress(session, self.job_id, self.worker, stage, self.fraction(stage, done, total))
        if stop == "cancelled":
            raise JobCancelled()
        if stop == "lost":
            raise LeaseLost()


class Heartbeat(threading.Thread):
    """Renews the job's lease while the pipeline runs (even inside a long stage), and enforces the
    hard time limit: a job still running well past ERQ_MAX_JOB_SECONDS is failed and its process exits."""

    def __init__(self, job_id: str, settings: Settings, out: Path):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.job_id, self.settings, self.out = job_id, settings, out
        self.worker = worker_name()
        self.deadline = time.monotonic() + settings.max_job_seconds + HARD_LIMIT_GRACE_SECONDS
        self.stopped = threading.Event()

    def run(self) -> None:
        interval = max(1.0, min(self.settings.lease_seconds / 4, HARD_LIMIT_GRACE_SECONDS / 2))
        while not self.stopped.wait(interval):
            if time.monotonic() > self.deadline:
                self.fail_and_exit()
            try:
                with session_scope(self.settings.database_url) as session:
                    jobs.heartbeat(session, self.job_id, self.worker)
            except Exception:  # a database hiccup must not kill the job; the next beat retries
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)

    def fail_and_exit(self) -> None:
        reason = (f"the job ran longer than ERQ_MAX_JOB_SECONDS={self.settings.max_job_seconds} and did not stop; "
                  "its worker process was ended")
        log.error("job %s: %s", self.job_id, reason)
        try:
            with session_scope(self.settings.database_url) as session:
                jobs.finish(session, self.job_id, "failed", reason, artifact_dir=self.out, worker=self.worker)
        finally:
            logging.shutdown()
            os._exit(EXIT_HARD_TIME_LIMIT)


def execute_job(job_id: str, settings: Settings) -> None:
    worker = worker_name()
    with session_scope(settings.database_url) as session:
        job = jobs.claim(session, job_id, worker)
        params = dict(job.params) if job else None
    if params is None:
        return  # cancelled, finished, or already taken by another worker: nothing to do
    out = ArtifactStore(settings.artifact_dir).job_dir(job_id)
    heartbeat = Heartbeat(job_id, settings, out)
    heartbeat.start()
    try:
        with _job_log(out):
            status, error, metrics = _run_pipeline(job_id, params, out, settings, worker)
    except OSError as exc:  # the artifact volume is full, read-only or gone
        status, error, metrics = "failed", f"cannot write the job's files in {out}: {exc}", None
    except Exception as exc:  # never leave the job running until its lease expires
        log.exception("job %s: the worker failed around the pipeline", job_id)
        status, error, metrics = "failed", f"internal error in the worker: {type(exc).__name__}: {exc}", None
    finally:
        heartbeat.stopped.set()
    if status == "lost":
        return  # the job is another run's now: that run records the outcome
    if status == "queued":  # the worker is shutting down: hand the job to the next worker now
        with session_scope(settings.database_url) as session:
            released = jobs.release(session, job_id, worker)
        if released:
            enqueue(app, job_id)  # this task's message is acked on return; the new one runs the job
        return
    with session_scope(settings.database_url) as session:
        jobs.finish(session, job_id, status, error, metrics, artifact_dir=out, worker=worker)


@contextmanager
def _job_log(out: Path) -> Iterator[None]:
    """Engine and worker log lines of this job go to out/job.log as well."""
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "job.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


def _run_pipeline(job_id: str, params: dict, out, settings: Settings,
                  worker: str) -> tuple[str, str | None, dict | None]:
    import erq_core

    log.info("job %s on %s: %s", job_id, worker_name(), params)
    try:
        config = erq_core.ErqConfig.from_dict(params)
        metrics = erq_core.run(config, out, progress=ProgressReporter(job_id, settings, worker),
                               device=_device())
    except LeaseLost:
        log.warning("job %s was re-queued while this worker ran it (late heartbeat); stopping this run", job_id)
        return "lost", None, None
    except WorkerShuttingDown:
        log.info("job %s interrupted: its worker is shutting down; re-queued", job_id)
        return "queued", None, None
    except JobCancelled:
        log.info("job %s cancelled", job_id)
        return "cancelled", jobs.CANCELLED, None
    except (JobTimedOut, erq_core.ErqError) as exc:
        log.error("job %s failed: %s", job_id, exc)
        return "failed", str(exc), None
    except OSError as exc:  # e.g. the artifact volume is full or read-only
        log.error("job %s failed: %s", job_id, exc)
        return "failed", f"storage error: {exc}", None
    except Exception as exc:
        log.error("job %s failed with an internal error:\n%s", job_id, traceback.format_exc())
        return "failed", f"internal error: {type(exc).__name__}: {exc}", None
    log.info("job %s succeeded: top-1 %s", job_id, metrics["quantized"]["top1"])
    return "succeeded", None, metrics


def _device() -> str | None:
    """The GPU of this pool process (`erq worker --concurrency N` on N GPUs: child i uses GPU i);
    None (CUDA when there is one, else the CPU) for the solo pool."""
    import billiard.process
    import torch

    index = getattr(billiard.process.current_process(), "index", None)
    if index is None or not torch.cuda.is_available():
        return None
    gpu = index % torch.cuda.device_count()
    torch.cuda.set_device(gpu)
    return f"cuda:{gpu}"
