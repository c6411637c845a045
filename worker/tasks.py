"""The one Celery task: run a job's ERQ pipeline under a lease (worker/lease.py: heartbeat, progress,
cancel) and end it with its outcome (worker/outcome.py: store the files, record the end, retries)."""
from __future__ import annotations

import logging
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from erq_core.registry import local_dir_path
from storage import jobs
from storage.artifacts import LOG_NAME, ArtifactStore, open_store, run_name
from storage.db import session_scope
from storage.models import Job, Owner
from storage.outcomes import Reason, RunOutcome
from storage.queue import RUN_JOB_TASK, make_celery
from storage.settings import Settings, get_settings
from worker import outcome
from worker.lease import Heartbeat, ProgressReporter
from worker.upload_cache import localized as localized_uploads

app = make_celery()
log = logging.getLogger("erq")


@dataclass
class Engine:
    """What `erq worker` resolved at start: the device jobs run on."""

    device: Optional[str] = None  # None: the engine's choice (CUDA when there is one)


engine = Engine()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@app.task(name=RUN_JOB_TASK)
def run_job(job_id: str) -> None:
    execute_job(job_id, get_settings())


def execute_job(job_id: str, settings: Settings) -> None:
    worker = worker_name()
    with session_scope(settings.database_url) as session:
        job = jobs.claim(session, job_id, worker)
        if job is None:
            _explain_unclaimed(session, job_id, settings)
            return  # cancelled, finished, or already taken by another worker: nothing to do
        params, attempt = dict(job.params), job.attempts
        owner = session.get(Owner, job.owner_id).name
    store = _artifact_store(settings)
    run = run_name(attempt)
    out = store.workspace(job_id, run)
    heartbeat = Heartbeat(job_id, settings, store, run, out, worker, past_deadline=lambda reason: (
        outcome.fail_past_deadline(store, settings, job_id, worker, run, out, reason)))
    heartbeat.start()
    try:
        result = _run(job_id, params, store, run, out, settings, worker, owner)
        if result.status is None:
            store.release_workspace(job_id, run)
            if result.reason == Reason.HANDED_BACK:
                outcome.hand_back(app, job_id, worker, settings)
            return  # lost: the job is another run's now, that run records the outcome
        heartbeat.stop_log_sync()  # from here on only the final log is stored
        outcome.publish(store, settings, job_id, worker, attempt, run, out, result)
    finally:
        heartbeat.stopped.set()


def _run(job_id: str, params: dict, store: ArtifactStore, run: str, out: Path, settings: Settings,
         worker: str, owner: str) -> RunOutcome:
    try:
        store.fresh_workspace(job_id, run)
        with _job_log(out, job_id):
            return _run_pipeline(job_id, params, out, settings, worker, owner)
    except OSError as exc:  # the artifact volume is full, read-only or gone
        return RunOutcome.failed(f"cannot write the job's files in {out}: {exc}", "storage_error")
    except Exception as exc:  # never leave the job running until its lease expires
        log.exception("job %s: the worker failed around the pipeline", job_id)
        return RunOutcome.failed(f"internal error in the worker: {type(exc).__name__}: {exc}", "internal_error")


_stores: dict[str, ArtifactStore] = {}


def _artifact_store(settings: Settings) -> ArtifactStore:
    """One store per process and settings: an S3 client is costly to make and safe to share."""
    key = settings.model_dump_json()
    if key not in _stores:
        _stores[key] = open_store(settings)
    return _stores[key]


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


def readable_roots(settings: Settings, owner: str, params: dict, local: dict) -> list[str]:
    """What the job may read: its owner's data roots, and its own uploads in this host's cache
    (the folders `localized` put in place of `dataset:ID` / `upload:ID`), not the rest of the cache."""
    cached = [local_dir_path(local[field]) or local[field] for field in ("dataset", "model")
              if local.get(field) != params.get(field)]
    return [str(root) for root in settings.data_roots_for(owner)] + cached


def _run_pipeline(job_id: str, params: dict, out: Path, settings: Settings, worker: str,
                  owner: str) -> RunOutcome:
    import erq_core
    from erq_core.paths import restricted_to

    log.info("job %s on %s: %s", job_id, worker, params)
    workers = settings.loader_workers
    log.info("data loaders: %s", f"{workers} worker processes" if workers is not None
             else "the engine's default (4 worker processes on a GPU, none on the CPU)")
    try:
        with localized_uploads(job_id, params, settings) as local, \
                restricted_to(readable_roots(settings, owner, params, local)):  # dataset:ID, upload:ID -> the cache
            config = erq_core.ErqConfig.from_dict(local)
            metrics = erq_core.run(config, out, progress=ProgressReporter(job_id, settings, worker),
                                   device=engine.device, loader_workers=workers)
        _name_uploads_as_submitted(out, params, local)
    except Exception as exc:
        return outcome.outcome_of(job_id, exc)
    log.info("job %s succeeded: top-1 %s", job_id, metrics["quantized"]["top1"])
    return RunOutcome(Reason.SUCCEEDED, metrics=metrics)


def _name_uploads_as_submitted(out: Path, params: dict, local: dict) -> None:
    """The engine ran on this host's cache folders for the job's uploads: its config.json and report
    name them as the job does (dataset:ID, upload:ID), not by a path of this worker's cache."""
    submitted = {field: params[field] for field in ("model", "dataset") if local.get(field) != params.get(field)}
    if not submitted:
        return
    from erq_core.checkpoint import read_config, write_json
    from erq_core.files import CONFIG_FILE
    from erq_core.report import write_report

    config = read_config(out)
    config["erq_config"].update(submitted)
    if "model" in submitted:
        config["model_source"]["spec"] = submitted["model"]
    write_json(out / CONFIG_FILE, config)
    write_report(out)
