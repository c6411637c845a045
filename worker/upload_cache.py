"""A worker's local copies of uploaded datasets and models, keyed by sha256: a job that names
`dataset:ID` or `upload:ID` runs on a folder of ERQ_UPLOAD_CACHE_DIR, fetched from the artifact
store (folder or S3) the first time. No file system is shared with the API.

    CACHE/SHA256/        the extracted upload (an ImageFolder, or config.json + model.safetensors)
    CACHE/SHA256.lock    held shared by every job using the entry; eviction needs it exclusive
    CACHE/SHA256.fetch   held exclusive while one process fetches the entry (another waits, then uses it)
    CACHE/SHA256.size    the entry's bytes
    CACHE/.tmp-SHA256-*  a fetch in progress (renamed into place when whole)

Locks are fcntl locks: safe between the slots of one host (processes) and released by the kernel
when a process dies. The cache stays under ERQ_UPLOAD_CACHE_BYTES by removing the least recently
used entries that no job is using; an entry in use is never removed (if all are, the cache may go
over until they are released). Lock files are never removed (a removed lock file could be locked by
two processes at once); the sweeper removes entries whose upload is gone from the database.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from storage import archives, uploads
from storage.artifacts import ArtifactStoreError
from storage.db import session_scope
from storage.models import UploadKind
from storage.settings import Settings
from storage.upload_store import UploadStore, open_upload_store

log = logging.getLogger("erq")
POLL_SECONDS = 0.2
TMP_PREFIX = ".tmp-"
EVICTION_LOCK = ".evict.lock"


class UploadFetchError(OSError):
    """The upload could not be copied from the artifact store (the job fails with `storage_error`)."""


@dataclass(frozen=True)
class Wanted:
    """What the cache needs to know of an upload to fetch it."""

    owner_id: int
    sha256: str
    kind: UploadKind
    unpacked_size: int
    spec: str


@contextmanager
def _locked(path: Path, mode: int, deadline: float, what: str) -> Iterator[None]:
    """Hold an fcntl lock on `path` (created if absent), waiting until `deadline` (monotonic) at most."""
    with open(path, "a+b") as handle:
        while True:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UploadFetchError(f"timed out waiting for {what} ({path})") from None
                time.sleep(POLL_SECONDS)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _try_exclusive(path: Path) -> object | None:
    """An open handle holding `path`'s exclusive lock, or None when someone holds it."""
    handle = open(path, "a+b")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return handle
    except BlockingIOError:
        handle.close()
        return None


class UploadCache:
    def __init__(self, folder: Path, max_bytes: int, store: UploadStore | None, limits: archives.Limits,
                 wait_seconds: float):
        self.folder, self.max_bytes, self.store, self.limits = Path(folder), max_bytes, store, limits
        self.wait_seconds = wait_seconds

    @classmethod
    def from_settings(cls, settings: Settings, store: UploadStore | None = None) -> "UploadCache":
        return cls(settings.upload_cache_dir, settings.upload_cache_bytes, store or open_upload_store(settings),
                   archives.Limits.from_settings(settings), settings.max_job_seconds)

    def entry(self, sha256: str) -> Path:
        return self.folder / sha256

    @contextmanager
    def use(self, wanted: Wanted) -> Iterator[Path]:
        """The upload's local folder, fetched if absent, kept from eviction until the block ends."""
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_seconds
        with _locked(self.folder / f"{wanted.sha256}.lock", fcntl.LOCK_SH, deadline, f"the cache entry of {wanted.spec}"):
            entry = self.entry(wanted.sha256)
            if not entry.is_dir():
                with _locked(self.folder / f"{wanted.sha256}.fetch", fcntl.LOCK_EX, deadline,
                             f"another process fetching {wanted.spec}"):
                    if not entry.is_dir():  # the process we waited for may have fetched it
                        self._fetch(wanted, deadline)
            os.utime(entry)  # most recently used
            yield entry

    def _fetch(self, wanted: Wanted, deadline: float) -> None:
        for stale in self.folder.glob(f"{TMP_PREFIX}{wanted.sha256}-*"):  # left by a fetcher that died
            shutil.rmtree(stale, ignore_errors=True)
        self.make_room(wanted.unpacked_size, deadline)
        scratch = self.folder / f"{TMP_PREFIX}{wanted.sha256}-{uuid.uuid4().hex}"
        scratch.mkdir()
        try:
            archive, content = scratch / "archive", scratch / "content"
            log.info("fetching %s (%s) into the upload cache %s", wanted.spec, wanted.sha256[:12], self.folder)
            try:
                self.store.fetch(wanted.owner_id, wanted.sha256, archive)
            except FileNotFoundError:
                raise _missing(wanted, "its archive is no longer in the artifact store") from None
            except (ArtifactStoreError, OSError) as exc:
                raise UploadFetchError(f"cannot fetch {wanted.spec} from the artifact store: {exc}") from exc
            if _sha256(archive) != wanted.sha256:
                raise UploadFetchError(f"the archive of {wanted.spec} in the artifact store does not match its "
                                       "sha256: it was changed or damaged there")
            content.mkdir()
            try:
                archives.unpack(archive, wanted.kind, self.limits, content)
            except archives.ArchiveRefused as exc:
                raise _missing(wanted, f"it cannot be extracted here: {exc}") from None
            size = sum(path.stat().st_size for path in content.rglob("*") if path.is_file())
            (self.folder / f"{wanted.sha256}.size").write_text(str(size))
            os.rename(content, self.entry(wanted.sha256))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def entries(self) -> list[tuple[float, str, int]]:
        """(last use, sha256, bytes) of every entry, least recently used first."""
        found = []
        for path in self.folder.iterdir() if self.folder.is_dir() else ():
            if path.is_dir() and not path.name.startswith("."):
                size_file = self.folder / f"{path.name}.size"
                size = int(size_file.read_text()) if size_file.is_file() else 0
                found.append((path.stat().st_mtime, path.name, size))
        return sorted(found)

    def make_room(self, needed: int, deadline: float) -> None:
        """Remove least recently used entries that no job is using until `needed` more bytes fit."""
        with _locked(self.folder / EVICTION_LOCK, fcntl.LOCK_EX, deadline, "the upload cache's eviction"):
            entries = self.entries()
            total = sum(size for _, _, size in entries)
            for _, sha256, size in entries:
                if total + needed <= self.max_bytes:
                    return
                if self.remove(sha256):
                    total -= size
            if total + needed > self.max_bytes:
                log.warning("the upload cache %s holds %d bytes in use: %d more go over ERQ_UPLOAD_CACHE_BYTES=%d "
                            "until jobs release them", self.folder, total, needed, self.max_bytes)

    def remove(self, sha256: str) -> bool:
        """Remove an entry no job is using; False when one is."""
        handle = _try_exclusive(self.folder / f"{sha256}.lock")
        if handle is None:
            return False
        try:
            shutil.rmtree(self.entry(sha256), ignore_errors=True)
            (self.folder / f"{sha256}.size").unlink(missing_ok=True)
        finally:
            handle.close()
        return True


def _missing(wanted: Wanted, why: str) -> Exception:
    from erq_core.errors import DatasetError, ModelLoadError

    kind = DatasetError if wanted.kind == UploadKind.DATASET else ModelLoadError
    return kind(f"{wanted.spec} cannot be used: {why}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


_caches: dict[str, UploadCache] = {}


def _cache(settings: Settings) -> UploadCache:
    """One cache per process and settings (its S3 client is costly to make and safe to share)."""
    key = settings.model_dump_json()
    if key not in _caches:
        _caches[key] = UploadCache.from_settings(settings)
    return _caches[key]


@contextmanager
def localized(job_id: str, params: dict, settings: Settings) -> Iterator[dict]:
    """The job's parameters with each upload it names (`dataset:ID`, `upload:ID`) replaced by its local
    folder in this host's cache, held there while the block runs. Raises DatasetError or
    ModelLoadError (the upload is gone), UploadFetchError (the store cannot be read)."""
    named = [field for field in uploads.PREFIXES if uploads.upload_ref(field, params.get(field))]
    if not named:
        yield params
        return
    wanted = {}
    with session_scope(settings.database_url) as session:
        for field in named:
            upload = uploads.for_job(session, job_id, field)
            if upload is None:
                raise _missing(Wanted(0, "", uploads.PREFIXES[field][1], 0, params[field]),
                               "it was deleted (or is not this job's owner's)")
            wanted[field] = Wanted(upload.owner_id, upload.sha256, upload.kind, upload.unpacked_size,
                                   uploads.spec_of(upload))
    local = dict(params)
    with ExitStack() as held:
        for field, item in wanted.items():
            folder = held.enter_context(_cache(settings).use(item))
            local[field] = str(folder) if field == "dataset" else f"local-dir:{folder}"
        yield local


PRUNE_SECONDS = 300


def prune(settings: Settings) -> list[str]:
    """Remove the cache entries whose upload no database row records any more (deleted, expired)
    and that no job is using, and fetches left by processes that died; returns the removed sha256s."""
    cache = UploadCache(settings.upload_cache_dir, settings.upload_cache_bytes, None,
                        archives.Limits.from_settings(settings), wait_seconds=0)
    for scratch in cache.folder.glob(f"{TMP_PREFIX}*") if cache.folder.is_dir() else ():
        fetching = _try_exclusive(cache.folder / f"{scratch.name[len(TMP_PREFIX):].split('-')[0]}.fetch")
        if fetching is not None:  # nobody is fetching that upload: a dead fetch's leftovers
            shutil.rmtree(scratch, ignore_errors=True)
            fetching.close()
    present = [sha256 for _, sha256, _ in cache.entries()]
    if not present:
        return []
    with session_scope(settings.database_url) as session:
        kept = uploads.recorded_sha256s(session, present)
    removed = [sha256 for sha256 in present if sha256 not in kept and cache.remove(sha256)]
    if removed:
        log.info("removed %d upload(s) from the cache %s: deleted or expired", len(removed), cache.folder)
    return removed


def sweeper_duties(settings: Settings) -> list:
    """This host's duty for its cache (the worker adds it to the sweeper's)."""
    from worker.sweeper import Duty

    return [Duty("upload cache", PRUNE_SECONDS, lambda: prune(settings))]
