"""The HTTP answer to an artifact download (GET or HEAD, Range included). The store says what to send
(storage/artifacts/download.py): a redirect to a presigned URL (a bucket with ERQ_S3_DOWNLOAD=redirect,
the default), or the bytes, whole or a range; this adds what the database knows: the ETag is the
artifact's sha256 in every case."""
from __future__ import annotations

import logging

from fastapi import Request, Response, status
from fastapi.responses import RedirectResponse, StreamingResponse

from service.problems import Problem
from storage.artifacts import ArtifactStore, ArtifactStoreError, media_type
from storage.artifacts.download import ArtifactGone, Download, DownloadRequest, RangeNotSatisfiable, RangeRequest
from storage.models import Artifact, Job

log = logging.getLogger("erq")


def artifact_response(request: Request, store: ArtifactStore, job: Job, artifact: Artifact, mode: str) -> Response:
    wanted = DownloadRequest(headers_only=request.method == "HEAD", redirect=mode == "redirect",
                             range=RangeRequest.parse(request.headers.get("range")))
    try:
        download = store.download(job.id, job.published_run, artifact.name, wanted)
    except ArtifactGone as exc:
        log.error("job %s: artifact %s is recorded but %s is missing", job.id, artifact.name, exc.where)
        raise artifact_missing(job.id, artifact.name) from None
    except RangeNotSatisfiable as exc:
        raise Problem(status.HTTP_416_RANGE_NOT_SATISFIABLE, "range_not_satisfiable",
                      f"the range {request.headers.get('range')!r} starts past the end of {artifact.name} "
                      f"({exc.size} bytes)", headers={"Content-Range": f"bytes */{exc.size}"}, field="Range") from None
    except ArtifactStoreError as exc:  # answered 503 artifact_store_unavailable
        log.warning("job %s: artifact %s unreadable from %s: %s", job.id, artifact.name, store.describe(), exc)
        raise
    return _answer(download, artifact)


def _answer(download: Download, artifact: Artifact) -> Response:
    etag = f'"{artifact.sha256}"'
    if download.url is not None:  # no caching: the URL expires, and it must not outlive a deleted job
        return RedirectResponse(download.url, status_code=status.HTTP_307_TEMPORARY_REDIRECT,
                                headers={"ETag": etag, "Cache-Control": "private, no-store"})
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Length": str(download.length),
               "Content-Disposition": f'attachment; filename="{artifact.name}"'}
    if download.byte_range is not None:
        headers["Content-Range"] = download.byte_range.content_range(download.size)
    if download.chunks is None:  # HEAD
        return Response(headers=headers, media_type=media_type(artifact.name))
    return StreamingResponse(download.chunks, media_type=media_type(artifact.name), headers=headers,
                             status_code=status.HTTP_206_PARTIAL_CONTENT if download.byte_range else status.HTTP_200_OK)


def artifact_missing(job_id: str, name: str) -> Problem:
    """A recorded artifact whose file is gone: the same answer from every route."""
    return Problem(status.HTTP_410_GONE, "artifact_missing",
                   f"the file of artifact {name!r} of job {job_id} is no longer in the artifact store")
