"""/v1/jobs: submit, follow, list, cancel, download."""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from typing import Optional

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from fastapi.responses import FileResponse, PlainTextResponse
from sqlalchemy.exc import IntegrityError, OperationalError

from service.auth import current_key_id
from service.schemas import ArtifactOut, JobList, JobOut, JobRequest
from service.validation import InvalidJob, validate_job
from storage import jobs
from storage.artifacts import PUBLISHED, ArtifactStore
from storage.db import session_scope
from storage.models import JOB_STATUSES, Job
from worker.celery_app import LEASE_SWEEP_SECONDS, enqueue, requeue_lost_jobs

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _utc(moment: Optional[dt.datetime]) -> Optional[dt.datetime]:
    """SQLite hands back naive datetimes: every timestamp in the API is UTC with its offset."""
    return moment.replace(tzinfo=dt.timezone.utc) if moment is not None and moment.tzinfo is None else moment


def job_out(request: Request, job: Job) -> JobOut:
    # Artifacts are recorded when a job ends: skipping the query for active jobs keeps polling cheap.
    artifacts = [ArtifactOut(name=a.name, size=a.size, sha256=a.sha256,
                             url=str(request.url_for("download_artifact", job_id=job.id, name=a.name)))
                 for a in (job.artifacts if job.status in jobs.TERMINAL else [])]
    return JobOut(id=job.id, status=job.status, stage=job.stage, progress=job.progress, params=job.params,
                  metrics=job.metrics, error=job.error, attempts=job.attempts,
                  heartbeat_at=_utc(job.heartbeat_at), created_at=_utc(job.created_at),
                  started_at=_utc(job.started_at), finished_at=_utc(job.finished_at), artifacts=artifacts)


def _not_found(job_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r} for this API key")


def _settings(request: Request):
    return request.app.state.settings


def _expire_lost_leases(request: Request) -> None:
    """Before answering a read, re-queue or fail jobs whose worker went silent (at most every few
    seconds per process): a job never shows `running` for long after its worker is gone."""
    state = request.app.state
    if time.monotonic() - getattr(state, "last_lease_sweep", float("-inf")) < LEASE_SWEEP_SECONDS:
        return
    state.last_lease_sweep = time.monotonic()
    try:
        requeue_lost_jobs(state.celery, state.settings)
    except OperationalError:
        raise  # the database is down: the read cannot be answered either (503)
    except Exception:
        logging.getLogger("erq").warning("lease sweep failed", exc_info=True)


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def submit_job(body: JobRequest, request: Request, response: Response, key_id: int = Depends(current_key_id),
               idempotency_key: Optional[str] = Header(None, max_length=200)) -> JobOut:
    settings = _settings(request)
    with session_scope(settings.database_url) as session:
        if idempotency_key and (existing := jobs.job_by_idempotency(session, key_id, idempotency_key)):
            return _accepted(request, response, existing)
    try:
        params = validate_job(body.model_dump(), settings.roots)
    except InvalidJob as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    try:
        with session_scope(settings.database_url) as session:
            if jobs.active_job_count(session, key_id) >= settings.max_active_jobs_per_key:
                raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                                    f"this key already has {settings.max_active_jobs_per_key} queued or running jobs "
                                    "(ERQ_MAX_ACTIVE_JOBS_PER_KEY); wait for one to finish",
                                    headers={"Retry-After": "30"})
            job = jobs.create_job(session, key_id, params, idempotency_key)
            job_id = job.id
    except IntegrityError:  # a concurrent retry with the same Idempotency-Key won the race
        with session_scope(settings.database_url) as session:
            return _accepted(request, response, jobs.job_by_idempotency(session, key_id, idempotency_key))
    try:
        enqueue(request.app.state.celery, job_id)
    except Exception:
        logging.getLogger("erq").warning("job %s not accepted: the broker is unreachable", job_id, exc_info=True)
        with session_scope(settings.database_url) as session:
            jobs.discard_unqueued(session, job_id)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the job queue is unreachable; retry later",
                            headers={"Retry-After": "10"}) from None
    with session_scope(settings.database_url) as session:
        return _accepted(request, response, session.get(Job, job_id))


def _accepted(request: Request, response: Response, job: Job) -> JobOut:
    response.headers["Location"] = str(request.url_for("get_job", job_id=job.id))
    return job_out(request, job)


@router.get("", response_model=JobList)
def list_jobs(request: Request, key_id: int = Depends(current_key_id),
              status_: Optional[str] = Query(None, alias="status"),
              limit: int = Query(20, ge=1, le=100), cursor: Optional[str] = Query(None, max_length=200)) -> JobList:
    if status_ is not None and status_ not in JOB_STATUSES:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"status must be one of {', '.join(JOB_STATUSES)}")
    _expire_lost_leases(request)
    with session_scope(_settings(request).database_url) as session:
        try:
            page, next_cursor = jobs.list_jobs(session, key_id, status_, limit, cursor)
        except ValueError:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "cursor is not one this API returned") from None
        return JobList(jobs=[job_out(request, job) for job in page], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut,
            responses={304: {"description": "the job has not changed since the ETag sent in If-None-Match"}})
def get_job(job_id: str, request: Request, key_id: int = Depends(current_key_id),
            if_none_match: Optional[str] = Header(None, max_length=200,
                                                  description="the ETag of the last answer: 304 if unchanged")):
    _expire_lost_leases(request)
    with session_scope(_settings(request).database_url) as session:
        job = jobs.job_for_key(session, job_id, key_id)
        if job is None:
            raise _not_found(job_id)
        body = job_out(request, job).model_dump_json()
    etag = f'"{hashlib.sha256(body.encode()).hexdigest()[:32]}"'
    if if_none_match is not None and etag in (tag.strip() for tag in if_none_match.split(",")):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    return Response(body, media_type="application/json", headers={"ETag": etag})


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, request: Request, key_id: int = Depends(current_key_id)) -> JobOut:
    with session_scope(_settings(request).database_url) as session:
        job = jobs.job_for_key(session, job_id, key_id)
        if job is None:
            raise _not_found(job_id)
        if job.status in jobs.TERMINAL:
            raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already {job.status}")
        jobs.request_cancel(session, job.id)
        session.refresh(job)
        return job_out(request, job)


@router.get("/{job_id}/artifacts/{name}", name="download_artifact")
def download_artifact(job_id: str, name: str, request: Request, key_id: int = Depends(current_key_id)):
    settings = _settings(request)
    with session_scope(settings.database_url) as session:
        job = jobs.job_for_key(session, job_id, key_id)
        if job is None:
            raise _not_found(job_id)
        artifact = next((a for a in job.artifacts if a.name == name), None)
    if artifact is None or name not in PUBLISHED:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"job {job_id} has no artifact {name!r} (artifacts appear when the job has finished)")
    path = ArtifactStore(settings.artifact_dir).path(job_id, name)
    media = "application/json" if name.endswith(".json") else (
        "text/plain; charset=utf-8" if name.endswith(".log") else "application/octet-stream")
    return FileResponse(path, media_type=media, filename=name, headers={"ETag": f'"{artifact.sha256}"'})


@router.get("/{job_id}/log", response_class=PlainTextResponse)
def job_log(job_id: str, request: Request, key_id: int = Depends(current_key_id)) -> str:
    settings = _settings(request)
    with session_scope(settings.database_url) as session:
        if jobs.job_for_key(session, job_id, key_id) is None:
            raise _not_found(job_id)
    path = ArtifactStore(settings.artifact_dir).log_path(job_id)
    return path.read_text(errors="replace") if path.is_file() else ""
