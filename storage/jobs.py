"""Job queries and state transitions, shared by the API and the workers.

queued -> running -> succeeded | failed | cancelled; queued -> cancelled. A running job holds a
lease renewed by its worker's heartbeat; when the lease expires the job goes back to queued
(up to ERQ_MAX_ATTEMPTS runs) or fails with the reason.
"""
from __future__ import annotations

import base64
import datetime as dt
import uuid
from pathlib import Path
from typing import Any, Optional

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from storage.artifacts import LOG_NAME, PUBLISHED, sha256_of
from storage.models import ACTIVE_STATUSES, Artifact, Job, utcnow

TERMINAL = ("succeeded", "failed", "cancelled")
CANCELLED = "cancelled by the client"


def create_job(session: Session, key_id: int, params: dict[str, Any], idempotency_key: Optional[str]) -> Job:
    job = Job(id=uuid.uuid4().hex, key_id=key_id, params=params, idempotency_key=idempotency_key,
              status="queued", progress=0.0, cancel_requested=False, attempts=0, created_at=utcnow())
    session.add(job)
    session.flush()
    return job


def discard_unqueued(session: Session, job_id: str) -> None:
    """Delete a job whose queue message could not be sent: its client was answered 503, so the job
    was never accepted and a retry with the same Idempotency-Key must create it afresh."""
    session.execute(delete(Job).where(Job.id == job_id, Job.status == "queued"))


def job_for_key(session: Session, job_id: str, key_id: int) -> Optional[Job]:
    return session.scalar(select(Job).where(Job.id == job_id, Job.key_id == key_id))


def job_by_idempotency(session: Session, key_id: int, idempotency_key: str) -> Optional[Job]:
    return session.scalar(select(Job).where(Job.key_id == key_id, Job.idempotency_key == idempotency_key))


def active_job_count(session: Session, key_id: int) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.key_id == key_id, Job.status.in_(ACTIVE_STATUSES))) or 0


def encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(f"{_naive(job.created_at).isoformat()}|{job.id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    created, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
    return dt.datetime.fromisoformat(created).replace(tzinfo=dt.timezone.utc), job_id


def list_jobs(session: Session, key_id: int, status: Optional[str], limit: int,
              cursor: Optional[str]) -> tuple[list[Job], Optional[str]]:
    """The key's jobs, newest first; returns (page, cursor of the next page or None)."""
    query = select(Job).where(Job.key_id == key_id)
    if status:
        query = query.where(Job.status == status)
    if cursor:
        created, job_id = decode_cursor(cursor)
        query = query.where((Job.created_at < created) | ((Job.created_at == created) & (Job.id < job_id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return rows[:limit], (encode_cursor(rows[limit - 1]) if len(rows) > limit else None)


def request_cancel(session: Session, job_id: str) -> None:
    """A queued job is cancelled now and never starts; a running one stops at its next progress step.
    Conditional updates, so that a worker claiming the job at the same moment cannot be overruled."""
    session.execute(update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES))
                    .values(cancel_requested=True))
    session.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                    .values(status="cancelled", finished_at=utcnow()))


def claim(session: Session, job_id: str, worker: str) -> Optional[Job]:
    """queued -> running for this worker, atomically; None when the job is not queued any more."""
    now = utcnow()
    claimed = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "queued", Job.cancel_requested.is_(False))
        .values(status="running", worker=worker, heartbeat_at=now, started_at=now, attempts=Job.attempts + 1,
                stage="starting", progress=0.0, error=None)
    ).rowcount
    if not claimed:  # a cancel that crossed a re-queue: the job ends here instead of waiting forever
        session.execute(update(Job).where(Job.id == job_id, Job.status == "queued", Job.cancel_requested.is_(True))
                        .values(status="cancelled", error=CANCELLED, finished_at=now))
    session.flush()
    return session.get(Job, job_id, populate_existing=True) if claimed else None


def heartbeat(session: Session, job_id: str, worker: str) -> None:
    session.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running")
                    .values(heartbeat_at=utcnow()))


def report_progress(session: Session, job_id: str, worker: str, stage: str, progress: float) -> Optional[str]:
    """Record the progress of `worker`'s run; returns why the run must stop ('cancelled', 'lost') or None.

    'lost': the job is not this worker's any more (its lease expired and the job was re-queued)."""
    owned = session.execute(update(Job).where(Job.id == job_id, Job.status == "running", Job.worker == worker)
                            .values(stage=stage, progress=progress, heartbeat_at=utcnow())).rowcount
    if not owned:
        return "lost"
    return "cancelled" if session.scalar(select(Job.cancel_requested).where(Job.id == job_id)) else None


def finish(session: Session, job_id: str, status: str, error: Optional[str] = None,
           metrics: Optional[dict] = None, artifact_dir: Optional[Path] = None, worker: Optional[str] = None) -> None:
    """End a job (unless it already ended); with `worker`, only while the job is that worker's run."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status in TERMINAL or (worker is not None and job.worker != worker):
        return
    if artifact_dir is not None:
        # A job that did not succeed publishes only its log: files of an unfinished run are not results.
        for name in PUBLISHED if status == "succeeded" else (LOG_NAME,):
            path = artifact_dir / name
            if path.is_file():
                session.add(Artifact(job_id=job_id, name=name, size=path.stat().st_size, sha256=sha256_of(path)))
    job.metrics = metrics
    _finish(job, status, error)


def _finish(job: Job, status: str, error: Optional[str]) -> None:
    job.status, job.error, job.finished_at = status, error, utcnow()
    if status == "succeeded":
        job.progress, job.stage = 1.0, "done"


def expire_leases(session: Session, lease_seconds: int, max_attempts: int) -> list[str]:
    """Running jobs whose worker went silent: re-queue them (returned) or fail them."""
    cutoff = utcnow() - dt.timedelta(seconds=lease_seconds)
    requeued = []
    lost = select(Job).where(Job.status == "running", Job.heartbeat_at < cutoff).with_for_update(skip_locked=True)
    for job in session.scalars(lost):  # concurrent sweepers (workers, API) each take different rows
        if job.cancel_requested:
            _finish(job, "cancelled", CANCELLED)
        elif job.attempts < max_attempts:
            job.status, job.stage, job.progress, job.worker = "queued", "requeued after worker loss", 0.0, None
            requeued.append(job.id)
        else:
            _finish(job, "failed", f"worker {job.worker} stopped answering during attempt {job.attempts} "
                                   f"of {max_attempts} (no heartbeat for {lease_seconds} s)")
    return requeued


def release(session: Session, job_id: str, worker: str) -> bool:
    """running -> queued when its worker shuts down on purpose; that run does not count as an attempt."""
    released = session.execute(
        update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running",
                          Job.cancel_requested.is_(False))
        .values(status="queued", stage="requeued: its worker shut down", progress=0.0, worker=None,
                attempts=Job.attempts - 1)
    ).rowcount
    if not released:  # cancelled meanwhile
        session.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running")
                        .values(status="cancelled", error=CANCELLED, finished_at=utcnow()))
    return bool(released)


def _queued_before(created_before: dt.datetime):
    return (Job.status == "queued") & (Job.created_at < created_before)


def queued_before(session: Session, created_before: dt.datetime) -> int:
    """How many jobs created before `created_before` still wait for a worker."""
    return session.scalar(select(func.count()).select_from(Job).where(_queued_before(created_before))) or 0


def queued_ids_before(session: Session, created_before: dt.datetime) -> list[str]:
    """The jobs created before `created_before` that still wait for a worker, oldest first."""
    return list(session.scalars(select(Job.id).where(_queued_before(created_before))
                                .order_by(Job.created_at, Job.id)))


def counts_by_status(session: Session) -> dict[str, int]:
    return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())


def finished_durations(session: Session) -> list[float]:
    rows = session.execute(select(Job.started_at, Job.finished_at).where(
        Job.status == "succeeded", Job.started_at.is_not(None))).all()
    return [(_naive(end) - _naive(start)).total_seconds() for start, end in rows]


def _naive(moment: dt.datetime) -> dt.datetime:
    """SQLite returns naive datetimes, PostgreSQL aware ones: compare them as naive UTC."""
    return moment.astimezone(dt.timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment
