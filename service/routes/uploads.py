"""/v1/datasets and /v1/models: upload an ImageFolder dataset or a timm model folder, list, show,
delete. An upload is received streamed onto local disk (never whole in memory), checked member by
member (storage/archives.py), stored in the artifact store and recorded (storage/uploads.py); a job
then names it as `dataset:ID` or `upload:ID`.

The body is an archive (zip, tar, tar.gz) sent raw or as the part `file` of a multipart form; a
model may instead come as the multipart parts `config` (config.json) and `weights`
(model.safetensors). Uploads are chunked, not resumable: a broken upload is sent again (the same
bytes become the same upload)."""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response, status
from starlette.datastructures import UploadFile

from service import problems
from service.auth import Caller, CurrentCaller
from service.deps import AppSettings, DbSession
from service.problems import Problem
from service.schemas import DatasetList, DatasetOut, UploadedModelList, UploadedModelOut
from storage import archives, uploads
from storage.archives import ArchiveRefused, Limits
from storage.db import session_scope
from storage.jobs import decode_cursor
from storage.models import Upload, UploadKind
from storage.settings import Settings
from storage.upload_store import UploadStore, open_upload_store

log = logging.getLogger("erq")
router = APIRouter(responses=problems.responses(401, 422, 429, 500, 503))
ARCHIVE_TYPES = ("application/zip", "application/x-zip-compressed", "application/x-tar", "application/gzip",
                 "application/x-gzip", "application/octet-stream")
MULTIPART = "multipart/form-data"
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers beside the files of a form
WRITE_BLOCK = 1 << 20
UPLOAD_PATHS = ("/v1/datasets", "/v1/models")  # bodies the 64 KiB request limit does not apply to
UPLOAD_ERRORS = problems.responses(411, 413, 415)
NOT_FOUND = problems.responses(404)


def upload_store(request: Request) -> UploadStore:
    """The process's one upload store (an S3 client is costly to make and safe to share)."""
    state = request.app.state
    if getattr(state, "upload_store", None) is None:
        state.upload_store = open_upload_store(state.settings)
    return state.upload_store


Uploads = Annotated[UploadStore, Depends(upload_store)]


def _binary(description: str) -> dict[str, Any]:
    return {"schema": {"type": "string", "format": "binary", "description": description}}


def _request_body(parts: dict[str, str]) -> dict[str, Any]:
    raw = {media: _binary("the archive") for media in ("application/zip", "application/x-tar", "application/gzip")}
    form = {"schema": {"type": "object", "properties": {name: {"type": "string", "format": "binary",
                                                               "description": help_}
                                                        for name, help_ in parts.items()}}}
    return {"requestBody": {"required": True, "content": {**raw, MULTIPART: form}}}


class Received:
    """An upload on local disk: its staging folder (removed by `discard`), and its files by part."""

    def __init__(self, folder: Path):
        self.folder, self.files, self.filename = folder, {}, None

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _quota_left(settings: Settings, caller: Caller) -> int:
    with session_scope(settings.database_url, settings.database_pool) as session:
        return settings.max_upload_bytes_per_owner - uploads.bytes_used(session, caller.owner_id)


def _over_quota(settings: Settings, left: int, size: Optional[int] = None) -> Problem:
    used = settings.max_upload_bytes_per_owner - left
    sent = f"this upload ({size} bytes)" if size is not None else "this upload"
    return Problem(status.HTTP_413_CONTENT_TOO_LARGE, "upload_quota_exceeded",
                   f"{sent} does not fit the owner's storage quota: {used} of ERQ_MAX_UPLOAD_BYTES_PER_OWNER="
                   f"{settings.max_upload_bytes_per_owner} bytes used; delete uploads you no longer need",
                   quota_bytes=settings.max_upload_bytes_per_owner, used_bytes=used, upload_bytes=size)


async def receive(request: Request, settings: Settings, caller: Caller, parts: tuple[str, ...]) -> Received:
    """Stream the body (raw archive, or the form parts `parts`) onto local disk, refusing with 413 as
    soon as it cannot fit the owner's quota."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != MULTIPART and media not in ARCHIVE_TYPES:
        raise Problem(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type",
                      f"send the archive as application/zip, application/x-tar or application/gzip, or as the part "
                      f"'file' of a multipart/form-data form (got {media or 'no Content-Type'!r})")
    left = await anyio.to_thread.run_sync(_quota_left, settings, caller)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        slack = MULTIPART_OVERHEAD if media == MULTIPART else 0
        if int(declared) > left + slack:
            raise _over_quota(settings, left, int(declared) - slack if slack else int(declared))
    elif media == MULTIPART:
        raise Problem(status.HTTP_411_LENGTH_REQUIRED, "length_required",
                      "a multipart upload needs a Content-Length (or send the archive itself as the body, chunked)")
    staging = settings.scratch_dir / "uploads"
    staging.mkdir(parents=True, exist_ok=True)
    received = Received(Path(tempfile.mkdtemp(dir=staging, prefix="upload-")))
    try:
        if media == MULTIPART:
            await _receive_form(request, received, parts, settings, left)
        else:
            await _receive_raw(request, received, settings, left)
    except BaseException:
        received.discard()
        raise
    return received


async def _receive_raw(request: Request, received: Received, settings: Settings, left: int) -> None:
    path, size, pending = received.folder / "file", 0, []
    with open(path, "wb") as handle:
        async for chunk in request.stream():
            size += len(chunk)
            if size > left:
                raise _over_quota(settings, left)
            pending.append(chunk)
            if sum(map(len, pending)) >= WRITE_BLOCK:
                await anyio.to_thread.run_sync(handle.write, b"".join(pending))
                pending.clear()
        await anyio.to_thread.run_sync(handle.write, b"".join(pending))
    received.files["file"] = path


async def _receive_form(request: Request, received: Received, parts: tuple[str, ...], settings: Settings,
                        left: int) -> None:
    try:
        form = await request.form(max_files=len(parts), max_fields=len(parts))
    except Exception as exc:  # starlette's MultiPartException and friends: a malformed form
        raise Problem(status.HTTP_422_UNPROCESSABLE_CONTENT, "invalid_form",
                      f"the multipart form cannot be read ({exc}); send the parts {', '.join(parts)}") from None
    try:
        for name in parts:
            part = form.get(name)
            if isinstance(part, UploadFile):
                received.files[name] = received.folder / name
                if name in ("file", "weights"):
                    received.filename = part.filename
                await anyio.to_thread.run_sync(_copy, part.file, received.files[name])
        if sum(path.stat().st_size for path in received.files.values()) > left:
            raise _over_quota(settings, left)
    finally:
        await form.close()


def _copy(source, path: Path) -> None:
    source.seek(0)
    with open(path, "wb") as out:
        shutil.copyfileobj(source, out, WRITE_BLOCK)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(WRITE_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _stage_dataset(received: Received, settings: Settings) -> tuple[uploads.Staged, Path]:
    path = received.files.get("file")
    if path is None:
        raise Problem(status.HTTP_422_UNPROCESSABLE_CONTENT, "invalid_form",
                      "the form has no part 'file': send the archive as the part 'file'", field="file")
    summary = archives.check_dataset(path, Limits.from_settings(settings))
    staged = uploads.Staged(kind=UploadKind.DATASET, sha256=_sha256(path), size=path.stat().st_size,
                            unpacked_size=summary.unpacked_size, archive_format=archives.sniff_format(path),
                            filename=_clean_name(received.filename),
                            details={"train_images": summary.train_images, "val_images": summary.val_images,
                                     "classes": summary.classes})
    return staged, path


def _stage_model(received: Received, settings: Settings) -> tuple[uploads.Staged, Path]:
    from erq_core.registry import supported_timm_names

    folder = received.folder / "model"
    folder.mkdir()
    if "file" in received.files:
        archives.extract_model(received.files["file"], Limits.from_settings(settings), folder)
    elif set(received.files) == {"config", "weights"}:
        received.files["config"].rename(folder / "config.json")
        received.files["weights"].rename(folder / "model.safetensors")
    else:
        raise Problem(status.HTTP_422_UNPROCESSABLE_CONTENT, "invalid_form",
                      "send the parts 'config' (config.json) and 'weights' (model.safetensors), or the folder as an "
                      "archive in the part 'file' (or as the body)", field="weights" if "config" in received.files
                      else "config")
    summary = archives.check_model(folder, lambda name: name.split(".", 1)[0] in supported_timm_names())
    packed = received.folder / "model.tar"
    archives.pack_model(folder, packed)
    staged = uploads.Staged(kind=UploadKind.MODEL, sha256=_sha256(packed), size=packed.stat().st_size,
                            unpacked_size=summary.unpacked_size, archive_format="tar",
                            filename=_clean_name(received.filename),
                            details={"architecture": summary.architecture, "num_classes": summary.num_classes,
                                     "parameters": summary.parameters})
    return staged, packed


def _clean_name(name: Optional[str]) -> Optional[str]:
    return name.replace("\\", "/").rsplit("/", 1)[-1][:255] or None if name else None


async def _accept(request: Request, caller: Caller, settings: Settings, parts: tuple[str, ...],
                  stage: Callable[[Received, Settings], tuple[uploads.Staged, Path]],
                  store: UploadStore) -> tuple[Upload, bool]:
    """Receive, check, store and record an upload: (the upload, whether it is new)."""
    received = await receive(request, settings, caller, parts)
    try:
        if received.filename is None:
            received.filename = request.headers.get("x-filename") or None
        try:
            staged, path = await anyio.to_thread.run_sync(stage, received, settings)
        except ArchiveRefused as exc:
            raise Problem(exc.status, exc.code, str(exc)) from None
        return await anyio.to_thread.run_sync(_record, settings, store, caller, staged, path)
    finally:
        received.discard()


def _created(response: Response, created: bool, location: str) -> None:
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    response.headers["Location"] = location


def _record(settings: Settings, store: UploadStore, caller: Caller, staged: uploads.Staged,
            path: Path) -> tuple[Upload, bool]:
    with session_scope(settings.database_url, settings.database_pool) as session:
        try:
            return uploads.record(session, store, caller.owner_id, staged, path, settings.max_upload_bytes_per_owner)
        except uploads.QuotaExceeded as exc:
            raise Problem(status.HTTP_413_CONTENT_TOO_LARGE, "upload_quota_exceeded", str(exc),
                          quota_bytes=exc.limit, used_bytes=exc.used, upload_bytes=exc.size) from None


def _out(upload: Upload, settings: Settings) -> dict[str, Any]:
    ttl = settings.upload_ttl_days
    return {**uploads.describe(upload), "expires_at": upload.last_used_at + dt.timedelta(days=ttl) if ttl else None}


def _owned(session, upload_id: str, caller: Caller, kind: UploadKind) -> Upload:
    upload = uploads.upload_for_owner(session, upload_id, caller.owner_id, kind)
    if upload is None:
        what = "dataset" if kind == UploadKind.DATASET else "uploaded model"
        raise Problem(status.HTTP_404_NOT_FOUND, "upload_not_found", f"no {what} {upload_id!r} for this API key's owner")
    return upload


def _page(session, caller: Caller, kind: UploadKind, limit: int, after: Optional[str], cursor: Optional[str]):
    if cursor:
        try:
            decode_cursor(cursor)
        except ValueError:
            raise Problem(status.HTTP_422_UNPROCESSABLE_CONTENT, "invalid_cursor", "cursor is not one this API "
                          "returned", field="cursor") from None
    after_upload = None
    if after is not None and (after_upload := uploads.upload_for_owner(session, after, caller.owner_id, kind)) is None:
        raise Problem(status.HTTP_422_UNPROCESSABLE_CONTENT, "invalid_cursor",
                      f"after={after!r} is not an upload of this owner (send the id of the last one of the previous "
                      "page)", field="after")
    return uploads.list_uploads(session, caller.owner_id, kind, limit, cursor, after_upload)


def _listing(key: str, found: tuple[list[Upload], Optional[str]], settings: Settings) -> dict[str, Any]:
    page, next_cursor = found
    return {key: [_out(u, settings) for u in page], "has_more": next_cursor is not None, "next_cursor": next_cursor}


def _delete(session, caller: Caller, upload_id: str, kind: UploadKind, store: UploadStore) -> Response:
    upload = _owned(session, upload_id, caller, kind)
    try:
        uploads.delete(session, store, upload)
    except uploads.UploadInUse as exc:
        session.rollback()
        raise Problem(status.HTTP_409_CONFLICT, "upload_in_use", str(exc), jobs=exc.job_ids) from None
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


LIMIT = Query(20, ge=1, le=100)
AFTER = Query(None, max_length=64, description="the page after this upload (its id)")
CURSOR = Query(None, max_length=200)


@router.post("/v1/datasets", tags=["datasets"], status_code=status.HTTP_201_CREATED, response_model=DatasetOut,
             responses={200: {"model": DatasetOut, "description": "the owner already has these bytes: that dataset"},
                        **UPLOAD_ERRORS},
             openapi_extra=_request_body({"file": "the archive (.zip, .tar, .tar.gz) of an ImageFolder"}))
async def upload_dataset(request: Request, response: Response, caller: CurrentCaller, settings: AppSettings,
                         store: Uploads) -> Any:
    """Upload an ImageFolder (train/CLASS/IMAGE, and val/CLASS/IMAGE for evaluation) as a zip, tar or
    tar.gz archive: the raw body, or the part `file` of a multipart form. Every member is checked and
    every image decoded before the answer; anything wrong answers 4xx and nothing is kept. A job uses
    it as `"dataset": "dataset:ID"`."""
    upload, created = await _accept(request, caller, settings, ("file",), _stage_dataset, store)
    _created(response, created, str(request.url_for("get_dataset", dataset_id=upload.id)))
    return _out(upload, settings)


@router.get("/v1/datasets", tags=["datasets"], response_model=DatasetList)
def list_datasets(caller: CurrentCaller, session: DbSession, settings: AppSettings, limit: int = LIMIT,
                  after: Optional[str] = AFTER, cursor: Optional[str] = CURSOR) -> Any:
    """The owner's datasets, newest first."""
    return _listing("datasets", _page(session, caller, UploadKind.DATASET, limit, after, cursor), settings)


@router.get("/v1/datasets/{dataset_id}", tags=["datasets"], name="get_dataset", response_model=DatasetOut,
            responses=NOT_FOUND)
def get_dataset(dataset_id: str, caller: CurrentCaller, session: DbSession, settings: AppSettings) -> Any:
    return _out(_owned(session, dataset_id, caller, UploadKind.DATASET), settings)


@router.delete("/v1/datasets/{dataset_id}", tags=["datasets"], status_code=status.HTTP_204_NO_CONTENT,
               response_class=Response, responses={**NOT_FOUND, **problems.responses(409)})
def delete_dataset(dataset_id: str, caller: CurrentCaller, session: DbSession, store: Uploads) -> Response:
    """Delete the dataset and its archive; 409 while a queued or running job names it."""
    return _delete(session, caller, dataset_id, UploadKind.DATASET, store)


@router.post("/v1/models", tags=["models"], status_code=status.HTTP_201_CREATED, response_model=UploadedModelOut,
             responses={200: {"model": UploadedModelOut, "description": "the owner already has this model"},
                        **UPLOAD_ERRORS, **problems.responses(403)},
             openapi_extra=_request_body({"config": "timm's config.json", "weights": "model.safetensors",
                                          "file": "or the folder as one archive (.zip, .tar, .tar.gz)"}))
async def upload_model(request: Request, response: Response, caller: CurrentCaller, settings: AppSettings,
                       store: Uploads) -> Any:
    """Upload a timm model folder: the multipart parts `config` (config.json) and `weights`
    (model.safetensors), or the folder as a zip, tar or tar.gz archive (the body, or the part `file`).
    Pickles are refused. The architecture must be one erq quantizes and the safetensors file must be
    whole and consistent (checked from its header, without loading it); a job uses it as
    `"model": "upload:ID"` (ERQ_ALLOWED_MODELS must admit `upload:*`, as it does by default)."""
    if not settings.model_allowed("upload:", frozenset()):
        raise Problem(status.HTTP_403_FORBIDDEN, "model_not_allowed",
                      f"uploaded models are not enabled on this service (ERQ_ALLOWED_MODELS="
                      f"{settings.allowed_models!r} does not admit upload:*)")
    upload, created = await _accept(request, caller, settings, ("config", "weights", "file"), _stage_model, store)
    _created(response, created, str(request.url_for("get_uploaded_model", model_id=upload.id)))
    return _out(upload, settings)


@router.get("/v1/models/uploads", tags=["models"], response_model=UploadedModelList)
def list_uploaded_models(caller: CurrentCaller, session: DbSession, settings: AppSettings, limit: int = LIMIT,
                         after: Optional[str] = AFTER, cursor: Optional[str] = CURSOR) -> Any:
    """The owner's uploaded models, newest first (GET /v1/models lists the forms a job's `model` takes)."""
    return _listing("models", _page(session, caller, UploadKind.MODEL, limit, after, cursor), settings)


@router.get("/v1/models/{model_id}", tags=["models"], name="get_uploaded_model", response_model=UploadedModelOut,
            responses=NOT_FOUND)
def get_uploaded_model(model_id: str, caller: CurrentCaller, session: DbSession, settings: AppSettings) -> Any:
    return _out(_owned(session, model_id, caller, UploadKind.MODEL), settings)


@router.delete("/v1/models/{model_id}", tags=["models"], status_code=status.HTTP_204_NO_CONTENT,
               response_class=Response, responses={**NOT_FOUND, **problems.responses(409)})
def delete_uploaded_model(model_id: str, caller: CurrentCaller, session: DbSession, store: Uploads) -> Response:
    """Delete the uploaded model and its archive; 409 while a queued or running job names it."""
    return _delete(session, caller, model_id, UploadKind.MODEL, store)
