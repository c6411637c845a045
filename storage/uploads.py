"""Uploaded datasets and models: their records and queries, shared by the API and the workers.

An upload is checked (storage/archives.py), its archive stored (storage/upload_store.py), then
recorded here under its owner and sha256. Whatever removes an archive (a delete, the retention
sweep, a refused quota) holds the owner's row lock, and recording checks that the archive is still
there under the same lock: a committed record always has its archive.

A job names an upload as `dataset:ID` (its `dataset`) or `upload:ID` (its `model`); the API checks
at submission that the owner has it, and the worker fetches it by sha256 (worker/upload_cache.py).
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.db import session_scope
from storage.jobs import decode_cursor, encode_cursor, lock_owner
from storage.models import ACTIVE_STATUSES, Job, Upload, UploadKind, db_now
from storage.upload_store import UploadStore

log = logging.getLogger("erq")
# How a job names an upload, per job field.
PREFIXES = {"dataset": ("dataset:", UploadKind.DATASET), "model": ("upload:", UploadKind.MODEL)}


def upload_ref(field: str, value: Any) -> Optional[str]:
    """The upload id a job's `field` names (`dataset:ID`, `upload:ID`), else None."""
    prefix, _ = PREFIXES.get(field, ("\0", None))
    return value[len(prefix):] if isinstance(value, str) and value.startswith(prefix) else None


def spec_of(upload: Upload) -> str:
    """What a job sends to use the upload."""
    field = "dataset" if upload.kind == UploadKind.DATASET else "model"
    return PREFIXES[field][0] + upload.id


@dataclass(frozen=True)
class Staged:
    """A checked archive on local disk, ready to be stored and recorded."""

    kind: UploadKind
    sha256: str
    size: int
    unpacked_size: int
    archive_format: str
    filename: Optional[str]
    details: dict[str, Any]


class QuotaExceeded(Exception):
    def __init__(self, used: int, size: int, limit: int):
        super().__init__(f"this upload of {size} bytes would bring the owner's uploads to {used + size} bytes, over "
                         f"ERQ_MAX_UPLOAD_BYTES_PER_OWNER={limit} ({used} bytes used): delete uploads you no longer "
                         "need (DELETE /v1/datasets/ID, /v1/models/ID)")
        self.used, self.size, self.limit = used, size, limit


def find_content(session: Session, owner_id: int, kind: UploadKind, sha256: str) -> Optional[Upload]:
    return session.scalar(select(Upload).where(Upload.owner_id == owner_id, Upload.kind == kind,
                                               Upload.sha256 == sha256))


def bytes_used(session: Session, owner_id: int) -> int:
    # int(): PostgreSQL sums a BIGINT column as NUMERIC (a Decimal)
    return int(session.scalar(select(func.coalesce(func.sum(Upload.size), 0)).where(Upload.owner_id == owner_id)) or 0)


def record(session: Session, store: UploadStore, owner_id: int, staged: Staged, path, quota: int) -> tuple[Upload, bool]:
    """Store the staged archive (at `path`) and record it for the owner: (the upload, whether it is
    new). The same content again is the existing upload. Raises QuotaExceeded, ArtifactStoreError.
    The caller commits (the owner's row lock is held until then)."""
    existing = find_content(session, owner_id, staged.kind, staged.sha256)
    if existing is not None:
        return existing, False
    store.put(owner_id, staged.sha256, path)  # outside the lock: the slow part
    lock_owner(session, owner_id)
    existing = find_content(session, owner_id, staged.kind, staged.sha256)
    if existing is not None:
        return existing, False  # a concurrent upload of the same bytes won
    used = bytes_used(session, owner_id)
    if used + staged.size > quota:
        if session.scalar(select(Upload.id).where(Upload.owner_id == owner_id, Upload.sha256 == staged.sha256)
                          .limit(1)) is None:
            store.remove(owner_id, staged.sha256)
        raise QuotaExceeded(used, staged.size, quota)
    if not store.exists(owner_id, staged.sha256):  # removed meanwhile by a delete of the same content
        store.put(owner_id, staged.sha256, path)
    upload = Upload(id=uuid.uuid4().hex, owner_id=owner_id, kind=staged.kind, sha256=staged.sha256, size=staged.size,
                    unpacked_size=staged.unpacked_size, archive_format=staged.archive_format,
                    filename=staged.filename, details=staged.details, created_at=db_now(), last_used_at=db_now())
    session.add(upload)
    session.flush()
    session.refresh(upload)  # the database's timestamps
    return upload, True


def upload_for_owner(session: Session, upload_id: str, owner_id: int, kind: UploadKind) -> Optional[Upload]:
    return session.scalar(select(Upload).where(Upload.id == upload_id, Upload.owner_id == owner_id,
                                               Upload.kind == kind))


def list_uploads(session: Session, owner_id: int, kind: UploadKind, limit: int, cursor: Optional[str] = None,
                 after: Optional[Upload] = None) -> tuple[list[Upload], Optional[str]]:
    """The owner's uploads of one kind, newest first, paged as jobs are (storage.jobs.list_jobs)."""
    query = select(Upload).where(Upload.owner_id == owner_id, Upload.kind == kind)
    if cursor or after is not None:
        created, upload_id = decode_cursor(cursor) if cursor else (after.created_at, after.id)
        query = query.where((Upload.created_at < created) | ((Upload.created_at == created) & (Upload.id < upload_id)))
    rows = list(session.scalars(query.order_by(Upload.created_at.desc(), Upload.id.desc()).limit(limit + 1)))
    return rows[:limit], (encode_cursor(rows[limit - 1]) if len(rows) > limit else None)


def _naming(upload: Upload):
    field = "dataset" if upload.kind == UploadKind.DATASET else "model"
    return Job.params[field].as_string() == spec_of(upload)


def active_jobs_using(session: Session, upload: Upload) -> list[str]:
    """The queued or running jobs that name the upload."""
    return list(session.scalars(select(Job.id).where(Job.owner_id == upload.owner_id,
                                                     Job.status.in_(ACTIVE_STATUSES), _naming(upload))))


class UploadInUse(Exception):
    def __init__(self, upload: Upload, job_ids: list[str]):
        super().__init__(f"{spec_of(upload)} is used by {len(job_ids)} queued or running job(s) "
                         f"({', '.join(job_ids[:5])}): cancel them or wait until they end, then delete it")
        self.job_ids = job_ids


def delete(session: Session, store: UploadStore, upload: Upload) -> None:
    """Remove an upload that no active job uses (else UploadInUse): its archive first, then its
    record (a store that fails raises ArtifactStoreError and leaves the record to retry). The caller
    commits."""
    lock_owner(session, upload.owner_id)
    using = active_jobs_using(session, upload)
    if using:
        raise UploadInUse(upload, using)
    shared = session.scalar(select(Upload.id).where(Upload.owner_id == upload.owner_id, Upload.id != upload.id,
                                                    Upload.sha256 == upload.sha256).limit(1))
    if shared is None:
        store.remove(upload.owner_id, upload.sha256)
    session.delete(upload)
    session.flush()


def use(session: Session, owner_id: int, params: dict[str, Any]) -> dict[str, Upload]:
    """The uploads a job's parameters name, by field, renewed (their retention counts from now).
    A name the owner has no upload for is left out: the caller says what is missing."""
    found = {}
    for field, (_, kind) in PREFIXES.items():
        upload_id = upload_ref(field, params.get(field))
        if upload_id is not None and (upload := upload_for_owner(session, upload_id, owner_id, kind)) is not None:
            upload.last_used_at = db_now()
            found[field] = upload
    return found


def for_job(session: Session, job_id: str, field: str) -> Optional[Upload]:
    """The upload a job's `field` names, of the job's owner (the worker's lookup)."""
    job = session.get(Job, job_id)
    upload_id = upload_ref(field, job.params.get(field)) if job is not None else None
    if upload_id is None:
        return None
    return upload_for_owner(session, upload_id, job.owner_id, PREFIXES[field][1])


def recorded_sha256s(session: Session, sha256s: list[str]) -> set[str]:
    """Which of these contents some upload still records (a worker's cache keeps only those)."""
    found: set[str] = set()
    for start in range(0, len(sha256s), 500):
        found |= set(session.scalars(select(Upload.sha256).where(Upload.sha256.in_(sha256s[start:start + 500]))))
    return found


def expire(database_url: str, store: UploadStore, ttl_seconds: float, limit: int = 100) -> list[str]:
    """Remove the uploads unused for `ttl_seconds` that no active job names, one transaction each;
    returns their ids. One in use, or used again meanwhile, stays."""
    with session_scope(database_url) as session:
        stale = list(session.scalars(select(Upload.id).where(Upload.last_used_at < db_now(-ttl_seconds))
                                     .order_by(Upload.last_used_at).limit(limit)))
    return [upload_id for upload_id in stale if _remove_one(database_url, store, upload_id, ttl_seconds)]


def delete_owner_uploads(database_url: str, store: UploadStore, owner_id: int) -> tuple[int, list[str]]:
    """Remove every upload of the owner that no active job uses: (how many went, the ids kept)."""
    with session_scope(database_url) as session:
        ids = list(session.scalars(select(Upload.id).where(Upload.owner_id == owner_id)))
    kept = [upload_id for upload_id in ids if not _remove_one(database_url, store, upload_id)]
    return len(ids) - len(kept), kept


def _remove_one(database_url: str, store: UploadStore, upload_id: str, unused_for: Optional[float] = None) -> bool:
    with session_scope(database_url) as session:
        upload = session.get(Upload, upload_id)
        if upload is None:
            return False
        lock_owner(session, upload.owner_id)
        if unused_for is not None and session.scalar(select(Upload.id).where(
                Upload.id == upload_id, Upload.last_used_at < db_now(-unused_for))) is None:
            return False  # a job named it since the sweep looked
        try:
            delete(session, store, upload)
        except UploadInUse:
            return False
    return True


def describe(upload: Upload) -> dict[str, Any]:
    """The fields every answer about an upload has."""
    return {"id": upload.id, "sha256": upload.sha256, "size": upload.size, "unpacked_size": upload.unpacked_size,
            "filename": upload.filename, "created_at": upload.created_at, "last_used_at": upload.last_used_at,
            "spec": spec_of(upload), **upload.details}
