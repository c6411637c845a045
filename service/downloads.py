"""The answer to an artifact download, from either store: a folder's file is streamed (Range
included); a bucket's object is a redirect to a short-lived presigned URL (ERQ_S3_DOWNLOAD=redirect,
the default) or streamed through the API (stream). The ETag is the artifact's sha256 in every case."""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Iterator, Optional

from fastapi import Request, Response, status
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from service.problems import Problem, problem_response
from storage.artifacts import ArtifactStore, media_type
from storage.folder import FolderStore
from storage.models import Artifact, Job

if TYPE_CHECKING:
    from storage.s3 import S3Store

log = logging.getLogger("erq")
CHUNK = 1 << 20


def artifact_response(request: Request, store: ArtifactStore, job: Job, artifact: Artifact, mode: str) -> Response:
    etag = f'"{artifact.sha256}"'
    if isinstance(store, FolderStore):
        return _from_folder(store, job, artifact.name, etag)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return _from_bucket(request, store, job, artifact, etag, mode)
    except (BotoCoreError, ClientError) as exc:
        log.warning("job %s: artifact %s unreadable from %s: %s", job.id, artifact.name, store.describe(), exc)
        raise Problem(status.HTTP_503_SERVICE_UNAVAILABLE, "artifact_store_unavailable",
                      "the artifact store is unreachable; retry later", headers={"Retry-After": "10"}) from None


def _gone(job: Job, name: str, where: str) -> Problem:
    log.error("job %s: artifact %s is recorded but %s is missing", job.id, name, where)
    return artifact_missing(job.id, name)


def artifact_missing(job_id: str, name: str) -> Problem:
    """A recorded artifact whose file is gone: the same answer from every route."""
    return Problem(status.HTTP_410_GONE, "artifact_missing",
                   f"the file of artifact {name!r} of job {job_id} is no longer in the artifact store")


def _from_folder(store: FolderStore, job: Job, name: str, etag: str) -> Response:
    path = store.path(job.id, job.published_run, name)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise _gone(job, name, str(path)) from None
    return FileDownload(path, media_type=media_type(name), filename=name, stat_result=stat, headers={"ETag": etag})


class FileDownload(FileResponse):
    """A file with Range support, where a Range that cannot be parsed, or names a unit other than
    bytes, is ignored and the whole file sent (RFC 9110 section 14.2), and one past the end answers
    a 416 problem, as every other 4xx."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        http_range = headers.get("range")
        if http_range is not None:
            try:
                self._parse_range_header(http_range, self.stat_result.st_size)
            except MalformedRangeHeader:
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]}
            except RangeNotSatisfiable:
                if headers.get("if-range") is not None:  # Starlette decides: If-Range may mean the whole file
                    return await super().__call__(scope, receive, send)
                return await _past_the_end(http_range, self.stat_result.st_size)(scope, receive, send)
        await super().__call__(scope, receive, send)


def _malformed(http_range: str, size: int) -> bool:
    try:
        FileResponse._parse_range_header(http_range, size)
    except MalformedRangeHeader:
        return True
    except RangeNotSatisfiable:
        pass
    return False


def _past_the_end(http_range: str, size: int) -> Response:
    return problem_response(416, "range_not_satisfiable", f"the range {http_range[:100]!r} starts past the end of "
                            f"the file ({size} bytes)", headers={"Content-Range": f"bytes */{size}"})


def _from_bucket(request: Request, store: "S3Store", job: Job, artifact: Artifact, etag: str, mode: str) -> Response:
    from botocore.exceptions import ClientError

    from storage.s3 import MISSING, error_code

    name, run = artifact.name, job.published_run
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{name}"'}
    if request.method == "HEAD" or mode == "redirect":
        head = store.head(job.id, run, name)  # a gone object answers 410 here rather than at the bucket
        if head is None:
            raise _gone(job, name, store.key(job.id, run, name))
        if request.method == "HEAD":
            return Response(headers={**headers, "Content-Length": str(head["ContentLength"])},
                            media_type=media_type(name))
        # No caching: the URL expires, and it must not outlive a deleted job.
        return RedirectResponse(store.presigned_url(job.id, run, name), status_code=status.HTTP_307_TEMPORARY_REDIRECT,
                                headers={"ETag": etag, "Cache-Control": "private, no-store"})
    byte_range = request.headers.get("range")
    if byte_range is not None and _malformed(byte_range, artifact.size):
        byte_range = None  # ignored, as from a folder (RFC 9110): the whole object
    try:
        answer = store.get(job.id, run, name, byte_range)
    except ClientError as exc:
        if error_code(exc) in MISSING:
            raise _gone(job, name, store.key(job.id, run, name)) from None
        if error_code(exc) == "InvalidRange":
            return _past_the_end(byte_range, artifact.size)
        raise
    headers["Content-Length"] = str(answer["ContentLength"])
    partial: Optional[str] = answer.get("ContentRange")
    if partial:
        headers["Content-Range"] = partial
    return StreamingResponse(_chunks(answer["Body"]), media_type=media_type(name), headers=headers,
                             status_code=status.HTTP_206_PARTIAL_CONTENT if partial else status.HTTP_200_OK)


def _chunks(body) -> Iterator[bytes]:
    with body:
        yield from body.iter_chunks(CHUNK)
