"""Job queries and state transitions, shared by the API and the workers.

queued -> running -> succeeded | failed | cancelled; queued -> cancelled. A running job holds a
lease renewed by its worker's heartbeat; when the lease expires the job goes back to queued
(up to ERQ_MAX_ATTEMPTS runs) or fails with the reason. Every lease time (heartbeat, start,
expiry) is the database's clock, never a worker's.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.orm import Session

from storage.artifacts import LOG_NAME, PUBLISHED, StoredFile
from storage.models import ACTIVE_STATUSES, TERMINAL_STATUSES, Artifact, Job, JobStatus, Owner, db_now
from storage.outcomes import Reason

TERMINAL = TERMINAL_STATUSES
CANCELLED = "cancelled by the client"


def request_fingerprint(body: dict[str, Any]) -> str:
    """The sha256 of a submitted body, to tell a retry from a different request under one Idempotency-Key."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def create_job(session: Session, owner_id: int, params: dict[str, Any], idempotency_key: Optional[str] = None,
               key_id: Optional[int] = None, request_sha256: Optional[str] = None,
               metadata: Optional[dict[str, str]] = None, webhook: Optional[dict[str, Any]] = None) -> Job:
    job = Job(id=uuid.uuid4().hex, owner_id=owner_id, key_id=key_id, params=params, idempotency_key=idempotency_key,
              request_sha256=request_sha256, status=JobStatus.QUEUED, progress=0.0, cancel_requested=False,
              attempts=0, created_at=db_now(), job_metadata=metadata, webhook=webhook)
    session.add(job)
    session.flush()
    return job


def lock_owner(session: Session, owner_id: int) -> None:
    """Hold the owner's row until the transaction ends, so that concurrent submissions of one owner
    count its active jobs one after another (a row lock on PostgreSQL; SQLite takes its write lock)."""
    session.execute(update(Owner).where(Owner.id == owner_id).values(id=Owner.id))


def discard_unqueued(session: Session, job_id: str) -> None:
    """Delete a job whose queue message could not be sent: its client was answered 503, so the job
    was never accepted and a retry with the same Idempotency-Key must create it afresh."""
    session.execute(delete(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED))


def job_for_owner(session: Session, job_id: str, owner_id: int) -> Optional[Job]:
    return session.scalar(select(Job).where(Job.id == job_id, Job.owner_id == owner_id))


def job_by_idempotency(session: Session, owner_id: int, idempotency_key: str) -> Optional[Job]:
    return session.scalar(select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == idempotency_key))


def active_job_count(session: Session, owner_id: int) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.owner_id == owner_id, Job.status.in_(ACTIVE_STATUSES))) or 0


def encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(f"{job.created_at.isoformat()}|{job.id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    created, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
    moment = dt.datetime.fromisoformat(created)
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)), job_id


@dataclass(frozen=True)
class JobFilter:
    """What a listing keeps: any of `statuses`, the exact `model`, created in [created_after,
    created_before), and every `metadata` pair."""

    statuses: tuple[str, ...] = ()
    model: Optional[str] = None
    created_after: Optional[dt.datetime] = None
    created_before: Optional[dt.datetime] = None
    metadata: tuple[tuple[str, str], ...] = ()


def list_jobs(session: Session, owner_id: int, status: Optional[str] | JobFilter, limit: int,
              cursor: Optional[str], after: Optional[Job] = None) -> tuple[list[Job], Optional[str]]:
    """The owner's jobs, newest first, after `cursor` (or the job `after`); returns (page, cursor of the
    next page or None). Raises ValueError for a cursor this code did not make."""
    where = status if isinstance(status, JobFilter) else JobFilter(statuses=(status,) if status else ())
    query = select(Job).where(Job.owner_id == owner_id)
    if where.statuses:
        query = query.where(Job.status.in_(where.statuses))
    if where.model is not None:
        query = query.where(Job.params["model"].as_string() == where.model)
    if where.created_after is not None:
        query = query.where(Job.created_at >= where.created_after)
    if where.created_before is not None:
        query = query.where(Job.created_at < where.created_before)
    for key, value in where.metadata:
        query = query.where(Job.job_metadata[key].as_string() == value)
    if cursor or after is not None:
        created, job_id = decode_cursor(cursor) if cursor else (after.created_at, after.id)
        query = query.where((Job.created_at < created) | ((Job.created_at == created) & (Job.id < job_id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return rows[:limit], (encode_cursor(rows[limit - 1]) if len(rows) > limit else None)


def request_cancel(session: Session, job_id: str) -> None:
    """A queued job is cancelled now and never starts; a running one stops at its next progress step.
    Conditional updates, so that a worker claiming the job at the same moment cannot be overruled."""
    session.execute(update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES))
                    .values(cancel_requested=True))
    session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                    .values(status=JobStatus.CANCELLED, finished_at=db_now()))


def claim(session: Session, job_id: str, worker: str) -> Optional[Job]:
    """queued -> running for this worker, atomically; None when the job is not queued any more."""
    claimed = session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.cancel_requested.is_(False))
        .values(status=JobStatus.RUNNING, worker=worker, heartbeat_at=db_now(), started_at=db_now(),
                attempts=Job.attempts + 1, stage="starting", progress=0.0, error=None, error_code=None)
    ).rowcount
    if not claimed:  # a cancel that crossed a re-queue: the job ends here instead of waiting forever
        session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED,
                                          Job.cancel_requested.is_(True))
                        .values(status=JobStatus.CANCELLED, error=CANCELLED, error_code="cancelled",
                                finished_at=db_now()))
    session.flush()
    return session.get(Job, job_id, populate_existing=True) if claimed else None


def heartbeat(session: Session, job_id: str, worker: str) -> None:
    session.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == JobStatus.RUNNING)
                    .values(heartbeat_at=db_now()))


def report_progress(session: Session, job_id: str, worker: str, stage: str, progress: float) -> Optional[Reason]:
    """Record the progress of `worker`'s run; returns why the run must stop, or None.

    Reason.LOST: the job is not this worker's any more (its lease expired and the job was re-queued);
    Reason.CANCELLED: the client asked to cancel it."""
    owned = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING,
                                              Job.worker == worker)
                            .values(stage=stage, progress=progress, heartbeat_at=db_now())).rowcount
    if not owned:
        return Reason.LOST
    return Reason.CANCELLED if session.scalar(select(Job.cancel_requested).where(Job.id == job_id)) else None


def finish(session: Session, job_id: str, status: JobStatus, error: Optional[str] = None,
           metrics: Optional[dict] = None, worker: Optional[str] = None, attempt: Optional[int] = None,
           run: Optional[str] = None, stored: Sequence[StoredFile] = (), error_code: Optional[str] = None) -> bool:
    """End a job (unless it already ended); with `worker`, only while the job is that worker's run,
    or, given its `attempt`, while the job waits re-queued with no newer run started (its lease ran
    out while the database was unreachable: the finished result still counts). The `stored` files
    of `run` (already stored and verified) become the job's artifacts. Returns whether this call
    ended the job."""
    job = session.get(Job, job_id, populate_existing=True, with_for_update=True)
    if job is None or job.status in TERMINAL or not _is_current_run(job, worker, attempt):
        return False
    if run is not None:
        # A job that did not succeed publishes only its log: files of an unfinished run are not results.
        published = PUBLISHED if status == JobStatus.SUCCEEDED else (LOG_NAME,)
        for item in stored:
            if item.name in published:
                session.add(Artifact(job_id=job_id, name=item.name, size=item.size, sha256=item.sha256))
        job.published_run = run
    job.metrics = metrics
    _finish(job, status, error, error_code)
    return True


def _is_current_run(job: Job, worker: Optional[str], attempt: Optional[int]) -> bool:
    if worker is None:
        return True
    if job.status == JobStatus.RUNNING:
        return job.worker == worker
    return (attempt is not None and job.status == JobStatus.QUEUED and job.attempts == attempt
            and not job.cancel_requested)


def _finish(job: Job, status: JobStatus, error: Optional[str], error_code: Optional[str] = None) -> None:
    job.status, job.error, job.finished_at = status, error, db_now()
    job.error_code = error_code if error is not None else None
    if status == JobStatus.SUCCEEDED:
        job.progress, job.stage = 1.0, "done"


def expire_leases(session: Session, lease_seconds: int, max_attempts: int) -> list[str]:
    """Running jobs whose worker went silent: re-queue them (returned) or fail them."""
    requeued = []
    lost = (select(Job).where(Job.status == JobStatus.RUNNING, Job.heartbeat_at < db_now(-lease_seconds))
            .with_for_update(skip_locked=True))
    for job in session.scalars(lost):  # concurrent sweepers each take different rows
        if job.cancel_requested:
            _finish(job, JobStatus.CANCELLED, CANCELLED, "cancelled")
        elif job.attempts < max_attempts:
            job.status, job.stage, job.progress, job.worker = JobStatus.QUEUED, "requeued after worker loss", 0.0, None
            requeued.append(job.id)
        else:
            _finish(job, JobStatus.FAILED, f"worker {job.worker} stopped answering during attempt {job.attempts} "
                                           f"of {max_attempts} (no heartbeat for {lease_seconds} s)", "worker_lost")
    return requeued


def release(session: Session, job_id: str, worker: str) -> bool:
    """running -> queued when its worker shuts down on purpose; that run does not count as an attempt."""
    released = session.execute(
        update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == JobStatus.RUNNING,
                          Job.cancel_requested.is_(False))
        .values(status=JobStatus.QUEUED, stage="requeued: its worker shut down", progress=0.0, worker=None,
                attempts=Job.attempts - 1)
    ).rowcount
    if not released:  # cancelled meanwhile
        session.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == JobStatus.RUNNING)
                        .values(status=JobStatus.CANCELLED, error=CANCELLED, error_code="cancelled",
                                finished_at=db_now()))
    return bool(released)


def _queued_longer_than(seconds: float):
    return (Job.status == JobStatus.QUEUED) & (Job.created_at < db_now(-seconds))


def queued_longer_than(session: Session, seconds: float) -> int:
    """How many jobs have waited for a worker for more than `seconds`."""
    return session.scalar(select(func.count()).select_from(Job).where(_queued_longer_than(seconds))) or 0


def queued_ids_longer_than(session: Session, seconds: float) -> list[str]:
    """The jobs that have waited for a worker for more than `seconds`, oldest first."""
    return list(session.scalars(select(Job.id).where(_queued_longer_than(seconds))
                                .order_by(Job.created_at, Job.id)))


def counts_by_status(session: Session) -> dict[str, int]:
    return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())


@dataclass(frozen=True)
class DurationHistogram:
    """Run times of succeeded jobs: how many took at most each bound (cumulative), all of them, their sum."""

    buckets: tuple[tuple[float, int], ...]
    count: int
    total_seconds: float


def duration_histogram(session: Session, bounds: Sequence[float]) -> DurationHistogram:
    """One aggregate query: its cost in the API does not grow with the number of jobs (one row back)."""
    seconds = _seconds_between(session, Job.started_at, Job.finished_at)
    done = (Job.status == JobStatus.SUCCEEDED) & Job.started_at.is_not(None) & Job.finished_at.is_not(None)
    row = session.execute(select(func.count(), func.coalesce(func.sum(seconds), 0.0),
                                 *[func.coalesce(func.sum(case((seconds <= bound, 1), else_=0)), 0) for bound in bounds])
                          .where(done)).one()
    return DurationHistogram(tuple(zip(bounds, (int(n) for n in row[2:]))), int(row[0]), float(row[1]))


def _seconds_between(session: Session, start, end):
    if session.get_bind().dialect.name == "sqlite":  # stored as text: julianday() reads it
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.extract("epoch", end - start)


def delete_job(session: Session, job: Job) -> None:
    """Delete an ended job's rows (its artifacts and webhook deliveries with it)."""
    session.delete(job)
    session.flush()


def jobs_past_retention(session: Session, ttl_seconds: float, limit: int = 100) -> list[Job]:
    """Ended jobs whose files are older than the retention and not removed yet, locked for this
    sweeper (concurrent sweepers take other rows)."""
    return list(session.scalars(
        select(Job).where(Job.status.in_(TERMINAL_STATUSES), Job.artifacts_expired_at.is_(None),
                          Job.finished_at < db_now(-ttl_seconds))
        .order_by(Job.finished_at).limit(limit).with_for_update(skip_locked=True)))
