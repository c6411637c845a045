"""/v1/jobs: submit, follow (poll, events, log), list, cancel, delete, download. Reads only read: lost leases and orphaned
jobs are repaired by the sweeper on the worker side (worker/sweeper.py)."""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from typing import Optional

import anyio
from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from sqlalchemy.exc import IntegrityError

from erq_core.files import RESULT_FOLDER
from service import events, problems
from service.auth import CurrentCaller
from service.deps import AppSettings, Artifacts, DbSession, Queue
from service.downloads import artifact_missing, artifact_response
from service.problems import Problem
from service.schemas import ArtifactOut, JobList, JobOut, JobSubmission, LogChunk, WebhookOut
from service.validation import InvalidJob, check_uploads, validate_job
from storage import jobs
from storage.artifacts import MEDIA_TYPES, PUBLISHED, ArtifactStoreError, media_type
from storage.artifacts.logs import log_run, read_log, whole_utf8
from storage.artifacts.tar import ResultTar
from storage.models import Job, JobStatus, Owner
from storage.queue import enqueue
from storage.webhooks import WebhookRefused, check_webhook, delivery_document

# Every route: a body that cannot be parsed, no or a bad key, too many requests, bad parameters, an outage, a bug.
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=problems.responses(400, 401, 422, 429, 500, 503))
JOB_ROUTE_ERRORS = problems.responses(404)
log = logging.getLogger("erq")
METADATA_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
NOT_PARAMETERS = {"metadata", "webhook"}  # fields of the body that are not parameters of the run
IfNoneMatch = Header(None, max_length=200, description="an ETag from an earlier answer: 304 if unchanged")


def job_out(request: Request, job: Job) -> JobOut:
    # Artifacts are recorded when a job ends: skipping the query for active jobs keeps polling cheap.
    artifacts = [ArtifactOut(name=a.name, size=a.size, sha256=a.sha256,
                             url=str(request.url_for("download_artifact", job_id=job.id, name=a.name)))
                 for a in (job.artifacts if job.status in jobs.TERMINAL else [])]
    webhook = None
    if job.webhook is not None:
        webhook = WebhookOut(**job.webhook, deliveries=[delivery_document(d) for d in job.deliveries])
    return JobOut(id=job.id, status=job.status, stage=job.stage, progress=job.progress, params=job.params,
                  metrics=job.metrics, metadata=job.job_metadata, error=job.error, error_code=job.error_code,
                  cancel_requested=job.cancel_requested,
                  attempts=job.attempts, heartbeat_at=job.heartbeat_at, created_at=job.created_at,
                  started_at=job.started_at, finished_at=job.finished_at,
                  artifacts_expired_at=job.artifacts_expired_at, artifacts=artifacts, webhook=webhook)


def _not_found(job_id: str) -> Problem:
    return Problem(status.HTTP_404_NOT_FOUND, "job_not_found", f"no job {job_id!r} for this API key's owner")


def _owned_job(session, job_id: str, caller) -> Job:
    job = jobs.job_for_owner(session, job_id, caller.owner_id)
    if job is None:
        raise _not_found(job_id)
    return job


def _matches(if_none_match: Optional[str], etag: str) -> bool:
    return if_none_match is not None and (if_none_match.strip() == "*" or
                                          etag in (tag.strip() for tag in if_none_match.split(",")))


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses=problems.responses(409, 413))
def submit_job(body: JobSubmission, request: Request, response: Response, caller: CurrentCaller, session: DbSession,
               settings: AppSettings, queue: Queue,
               idempotency_key: Optional[str] = Header(None, max_length=200)) -> JobOut:
    submitted = body.model_dump(exclude=NOT_PARAMETERS)
    extras = body.model_dump(include=NOT_PARAMETERS, exclude_none=True)
    fingerprint = jobs.request_fingerprint({**submitted, **extras})  # as before for a body of parameters only
    if idempotency_key and (existing := jobs.job_by_idempotency(session, caller.owner_id, idempotency_key)):
        return _replayed(request, response, existing, fingerprint, idempotency_key)
    owner = session.get(Owner, caller.owner_id)
    try:
        params = validate_job(submitted, settings, owner.name)
    except InvalidJob as exc:
        raise Problem(status.HTTP_422_UNPROCESSABLE_CONTENT, exc.code, str(exc), field=exc.field) from None
    webhook = None
    if body.webhook is not None:
        try:
            check_webhook(body.webhook.url, owner, settings)
        except WebhookRefused as exc:
            raise Problem(status.HTTP_422_UNPROCESSABLE_CONTENT, exc.code, str(exc), field="webhook.url") from None
        webhook = {"url": body.webhook.url, "events": list(dict.fromkeys(body.webhook.events))}
    try:
        jobs.lock_owner(session, caller.owner_id)  # held until the commit: the count below cannot go stale
        try:
            check_uploads(session, caller.owner_id, params)  # under the lock: a named upload cannot go meanwhile
        except InvalidJob as exc:
            raise Problem(exc.status, exc.code, str(exc), field=exc.field) from None
        limit = settings.max_active_jobs_per_owner
        if jobs.active_job_count(session, caller.owner_id) >= limit:
            raise Problem(status.HTTP_429_TOO_MANY_REQUESTS, "too_many_active_jobs",
                          f"this key's owner already has {limit} queued or running jobs "
                          "(ERQ_MAX_ACTIVE_JOBS_PER_OWNER); wait for one to finish",
                          headers={"Retry-After": "30"})
        job = jobs.create_job(session, caller.owner_id, params, idempotency_key, caller.key_id, fingerprint,
                              metadata=body.metadata, webhook=webhook)
        session.commit()
    except IntegrityError:
        session.rollback()
        if idempotency_key and (existing := jobs.job_by_idempotency(session, caller.owner_id, idempotency_key)):
            return _replayed(request, response, existing, fingerprint, idempotency_key)  # a concurrent retry won
        log.warning("job submission conflicted with a concurrent write", exc_info=True)
        raise Problem(status.HTTP_409_CONFLICT, "conflict", "the job conflicted with a concurrent change and was "
                                                            "not stored; send the request again") from None
    try:
        enqueue(queue, job.id)
    except Exception:
        log.warning("job %s not accepted: the broker is unreachable", job.id, exc_info=True)
        jobs.discard_unqueued(session, job.id)
        session.commit()
        raise Problem(status.HTTP_503_SERVICE_UNAVAILABLE, "queue_unavailable", "the job queue is unreachable; "
                      "retry later", headers={"Retry-After": "10"}) from None
    return _accepted(request, response, job)


def _replayed(request: Request, response: Response, job: Job, fingerprint: str, idempotency_key: str) -> JobOut:
    """The job an earlier request with this Idempotency-Key created, if the body is the same."""
    if job.request_sha256 is not None and job.request_sha256 != fingerprint:
        raise Problem(status.HTTP_422_UNPROCESSABLE_CONTENT, "idempotency_key_reused",
                      f"Idempotency-Key {idempotency_key!r} was already used for a different request "
                      f"(job {job.id}); send a new key for a new job", field="Idempotency-Key")
    return _accepted(request, response, job)


def _accepted(request: Request, response: Response, job: Job) -> JobOut:
    response.headers["Location"] = str(request.url_for("get_job", job_id=job.id))
    return job_out(request, job)


@router.get("", response_model=JobList)
def list_jobs(request: Request, caller: CurrentCaller, session: DbSession,
              status_: Optional[list[JobStatus]] = Query(None, alias="status",
                                                         description="only these statuses (repeat the parameter)"),
              model: Optional[str] = Query(None, max_length=1000, description="only jobs of this `model` as stored "
                                                                              "(local folders resolved)"),
              created_after: Optional[dt.datetime] = Query(None, description="created at or after (ISO 8601)"),
              created_before: Optional[dt.datetime] = Query(None, description="created before (ISO 8601)"),
              after: Optional[str] = Query(None, max_length=64, description="the page after this job (its id)"),
              limit: int = Query(20, ge=1, le=100), cursor: Optional[str] = Query(None, max_length=200)) -> JobList:
    """The owner's jobs, newest first. `metadata[KEY]=VALUE` (repeatable) keeps the jobs labelled so."""
    where = jobs.JobFilter(statuses=tuple(status_ or ()), model=model,
                           created_after=_utc(created_after, "created_after"),
                           created_before=_utc(created_before, "created_before"), metadata=_metadata_filters(request))
    if cursor:
        try:
            jobs.decode_cursor(cursor)
        except ValueError:
            raise Problem(status.HTTP_422_UNPROCESSABLE_CONTENT, "invalid_cursor", "cursor is not one this API "
                          "returned", field="cursor") from None
    after_job = None
    if after is not None and (after_job := jobs.job_for_owner(session, after, caller.owner_id)) is None:
        raise Problem(status.HTTP_422_UNPROCESSABLE_CONTENT, "invalid_cursor",
                      f"after={after!r} is not a job of this owner (send the id of the last job of the previous page)",
                      field="after")
    page, next_cursor = jobs.list_jobs(session, caller.owner_id, where, limit, cursor, after_job)
    return JobList(jobs=[job_out(request, job) for job in page], has_more=next_cursor is not None,
                   next_cursor=next_cursor)


def _utc(moment: Optional[dt.datetime], field: str) -> Optional[dt.datetime]:
    """The time in UTC (one without an offset is UTC). 0001-01-01T00:00:00+14:00 is before year 1 in
    UTC, which no datetime holds: 422."""
    if moment is None:
        return None
    try:
        return moment.replace(tzinfo=dt.timezone.utc) if moment.tzinfo is None else moment.astimezone(dt.timezone.utc)
    except OverflowError:
        raise Problem(status.HTTP_422_UNPROCESSABLE_CONTENT, "validation_error",
                      f"{field}: {moment.isoformat()} is outside the years 1 to 9999 in UTC", field=field) from None


def _metadata_filters(request: Request) -> tuple[tuple[str, str], ...]:
    pairs = []
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            key = name[len("metadata["):-1]
            if not METADATA_KEY.match(key):
                raise Problem(status.HTTP_422_UNPROCESSABLE_CONTENT, "validation_error",
                              f"{name}: a metadata key is 1 to 64 letters, digits or _.:-", field=name)
            pairs.append((key, value))
    return tuple(pairs)


@router.get("/{job_id}", response_model=JobOut,
            responses={304: {"description": "the job has not changed since the ETag sent in If-None-Match"},
                       **JOB_ROUTE_ERRORS})
def get_job(job_id: str, request: Request, caller: CurrentCaller, session: DbSession,
            if_none_match: Optional[str] = IfNoneMatch):
    body = job_out(request, _owned_job(session, job_id, caller)).model_dump_json()
    etag = f'"{hashlib.sha256(body.encode()).hexdigest()[:32]}"'
    if _matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    return Response(body, media_type="application/json", headers={"ETag": etag})


@router.post("/{job_id}/cancel", response_model=JobOut, responses={**JOB_ROUTE_ERRORS, **problems.responses(409)})
def cancel_job(job_id: str, request: Request, caller: CurrentCaller, session: DbSession) -> JobOut:
    job = _owned_job(session, job_id, caller)
    if job.status in jobs.TERMINAL:
        raise Problem(status.HTTP_409_CONFLICT, "job_finished", f"job {job_id} already {job.status}")
    jobs.request_cancel(session, job.id)
    session.commit()
    session.refresh(job)
    return job_out(request, job)


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               responses={**JOB_ROUTE_ERRORS, **problems.responses(409)})
def delete_job(job_id: str, caller: CurrentCaller, session: DbSession, store: Artifacts) -> Response:
    """Delete an ended job: its files first, then the job, which answers 404 from then on. An active
    job answers 409: cancel it first."""
    job = _owned_job(session, job_id, caller)
    if job.status not in jobs.TERMINAL:
        raise Problem(status.HTTP_409_CONFLICT, "job_active",
                      f"job {job_id} is {job.status}: cancel it first (POST /v1/jobs/{job_id}/cancel), then delete "
                      "it once it has ended")
    try:
        store.remove_job(job.id)  # files first: a failure leaves the job to retry
    except (OSError, ArtifactStoreError) as exc:  # a read-only volume, a bucket that refuses: the job is kept
        log.warning("job %s: its files cannot be removed: %s", job.id, exc)
        reason = (exc.strerror or type(exc).__name__) if isinstance(exc, OSError) else str(exc)
        raise Problem(status.HTTP_503_SERVICE_UNAVAILABLE, "artifact_store_unavailable",
                      f"the files of job {job_id} cannot be removed ({reason}); the job is kept: retry later",
                      headers={"Retry-After": "60"}) from None
    jobs.delete_job(session, job)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _check_not_expired(job: Job) -> None:
    if job.artifacts_expired_at is not None:
        raise Problem(status.HTTP_410_GONE, "artifacts_expired",
                      f"the files of job {job.id} were removed on {job.artifacts_expired_at.isoformat()} "
                      "(the service keeps them for ERQ_ARTIFACT_TTL_DAYS after a job ends)")


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "Server-Sent Events: `status`, `progress` and `log` events, each with "
                                            "an `id` and JSON `data`; the stream ends after the terminal status, "
                                            "or earlier with a `closed` event (`shutdown`, `key_revoked`)"},
                       **JOB_ROUTE_ERRORS})
async def job_events(job_id: str, request: Request, caller: CurrentCaller, session: DbSession,
                     last_event_id: Optional[str] = Header(None, max_length=100, description="resume after this "
                                                                                             "event")):
    """Follow a job live: its status, progress and log lines as Server-Sent Events. The first events
    are the current status and progress, then the log from the start (or from `Last-Event-ID`)."""
    def owned_then_close() -> Optional[Job]:
        try:
            return jobs.job_for_owner(session, job_id, caller.owner_id)
        finally:
            session.close()  # in the same thread: no connection held while the stream lasts

    job = await anyio.to_thread.run_sync(owned_then_close)
    if job is None:
        raise _not_found(job_id)
    hub = event_hub(request.app)
    limit = request.app.state.settings.max_event_streams_per_owner
    if limit and hub.open_streams(caller.owner_id) >= limit:  # no await since: the count cannot go stale
        raise Problem(status.HTTP_429_TOO_MANY_REQUESTS, "too_many_event_streams",
                      f"this key's owner already follows {limit} event streams on this API process "
                      "(ERQ_MAX_EVENT_STREAMS_PER_OWNER); close one, or poll GET /v1/jobs/{id}",
                      headers={"Retry-After": "5"}, limit=limit)
    follower = hub.follow(job_id, last_event_id, caller.key_id, caller.owner_id)
    return StreamingResponse(events.stream(hub, follower), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def event_hub(app) -> events.EventHub:
    """The process's one event poller (made in the event loop, on first use)."""
    if getattr(app.state, "event_hub", None) is None:
        app.state.event_hub = events.EventHub(app.state.settings, app.state.artifact_store)
    return app.state.event_hub


@router.get("/{job_id}/artifacts.tar", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-tar": {}},
                             "description": "a tar of quantized.safetensors, config.json and metrics.json"},
                       304: {"description": "If-None-Match holds the tar's ETag"},
                       **JOB_ROUTE_ERRORS, **problems.responses(409, 410)})
def download_result_folder(job_id: str, caller: CurrentCaller, session: DbSession, store: Artifacts,
                           if_none_match: Optional[str] = IfNoneMatch):
    """The whole result folder of a succeeded job as one tar, streamed: extract it and hand the folder
    to `erq_core.load_quantized`."""
    job = _owned_job(session, job_id, caller)
    _check_not_expired(job)
    if job.status != JobStatus.SUCCEEDED:
        raise Problem(status.HTTP_409_CONFLICT, "no_result", f"job {job_id} is {job.status}: only a succeeded job "
                                                             "has a result folder")
    recorded = {a.name: a for a in job.artifacts}
    for name in RESULT_FOLDER:
        if name not in recorded or store.read_range(job_id, job.published_run, name, 0, 0) is None:
            raise artifact_missing(job_id, name)
    etag = '"' + hashlib.sha256("".join(recorded[n].sha256 for n in RESULT_FOLDER).encode()).hexdigest()[:32] + '"'
    if _matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    tar = ResultTar(store, job_id, job.published_run, {name: recorded[name].size for name in RESULT_FOLDER},
                    mtime=int(job.finished_at.timestamp()) if job.finished_at else 0)
    return StreamingResponse(tar.stream(), media_type="application/x-tar",
                             headers={"Content-Length": str(tar.length), "ETag": etag,
                                      "Content-Disposition": f'attachment; filename="erq-{job_id}.tar"'})


ARTIFACT_RESPONSES = {200: {"description": "the file (206 with a Range), in its media type",
                            "content": {kind.split(";")[0]: {} for kind in (*MEDIA_TYPES.values(), media_type(""))}},
                      206: {"description": "the bytes a `Range: bytes=...` asked for"},
                      304: {"description": "If-None-Match holds the artifact's ETag (its sha256)"},
                      307: {"description": "with ERQ_ARTIFACT_URL=s3://... and ERQ_S3_DOWNLOAD=redirect: the "
                                           "file is at the short-lived presigned URL in Location (Range works)"},
                      **JOB_ROUTE_ERRORS, **problems.responses(410, 416)}


@router.get("/{job_id}/artifacts/{name}", name="download_artifact", responses=ARTIFACT_RESPONSES)
@router.head("/{job_id}/artifacts/{name}", name="artifact_headers", responses=ARTIFACT_RESPONSES,
             description="The headers of the download (size, ETag) without the file.")
def download_artifact(job_id: str, name: str, request: Request, caller: CurrentCaller, session: DbSession,
                      settings: AppSettings, store: Artifacts, if_none_match: Optional[str] = IfNoneMatch):
    job = _owned_job(session, job_id, caller)
    _check_not_expired(job)
    artifact = next((a for a in job.artifacts if a.name == name), None)
    if artifact is None or name not in PUBLISHED:
        raise Problem(status.HTTP_404_NOT_FOUND, "artifact_not_found",
                      f"job {job_id} has no artifact {name!r} (artifacts appear when the job has finished)")
    etag = f'"{artifact.sha256}"'
    if _matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    return artifact_response(request, store, job, artifact, settings.s3_download)


LOG_CHUNK_BYTES = 1 << 20


@router.get("/{job_id}/log", response_class=PlainTextResponse,
            responses={200: {"model": LogChunk, "description": "the log (text), or with `offset` and "
                                                               "`Accept: application/json` a LogChunk"},
                       **JOB_ROUTE_ERRORS, **problems.responses(410, 416)})
def job_log(job_id: str, request: Request, caller: CurrentCaller, session: DbSession, store: Artifacts,
            offset: Optional[int] = Query(None, ge=0, description="return the log from this byte on (at most 1 MiB); "
                                                                   "the answer says the next offset")):
    """The log of the job's published run, or of its latest run while it has none (from a bucket: as
    of the run's last heartbeat). With `offset`, the bytes from there on: `Erq-Next-Offset` is where
    to continue, `Erq-Log-Complete: true` once the job has ended and everything was sent;
    `Accept: application/json` gives the same as a LogChunk."""
    job = _owned_job(session, job_id, caller)
    _check_not_expired(job)
    start = offset or 0
    data, size = read_log(store, job.id, log_run(job.published_run, job.attempts), start,
                          LOG_CHUNK_BYTES if offset is not None else None)
    if start > size:
        raise Problem(status.HTTP_416_RANGE_NOT_SATISFIABLE, "offset_past_end",
                      f"offset {start} is past the end of the log ({size} bytes); a job that was re-run starts a "
                      "new log: continue from 0", field="offset")
    if offset is not None and (job.status not in jobs.TERMINAL or start + len(data) < size):
        data = whole_utf8(data)  # a character cut by the chunk's end or still being written comes next time
    next_offset = start + len(data)
    complete = job.status in jobs.TERMINAL and next_offset >= size
    text = data.decode(errors="replace")
    headers = {"Erq-Next-Offset": str(next_offset), "Erq-Log-Complete": "true" if complete else "false"}
    if offset is not None and "application/json" in request.headers.get("accept", ""):
        return JSONResponse(LogChunk(offset=start, next_offset=next_offset, complete=complete, text=text).model_dump(),
                            headers=headers)
    return PlainTextResponse(text, headers=headers)
