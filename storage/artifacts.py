"""The artifact store: where a job's files live, shared by the API (downloads, logs) and the workers
(which store a run's files). Two backends: a folder (storage/folder.py, the default) and an
S3-compatible bucket (storage/s3.py, with ERQ_ARTIFACT_URL=s3://BUCKET/PREFIX).

Each run of a job writes only into its own workspace and is stored under its own name
(`JOB/attempt-N/`), so a run that lost its lease but is still writing never touches the files of
the run that replaced it. A run's files are stored and verified before the run records the job's
end; the run that records it names itself in the database (`jobs.published_run`, in the same
transaction as the sizes and checksums): that run's files are the job's artifacts.
"""
from __future__ import annotations

import hashlib
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TYPE_CHECKING, Iterable, Optional

if TYPE_CHECKING:
    from storage.settings import Settings

LOG_NAME = "job.log"
PUBLISHED = ("quantized.safetensors", "config.json", "metrics.json", LOG_NAME, "model.onnx", "model-float64.onnx",
             "model-int8.onnx", "model-w4.onnx", "report.html")


def run_name(attempt: int) -> str:
    return f"attempt-{attempt}"


MEDIA_TYPES = {".json": "application/json", ".log": "text/plain; charset=utf-8", ".html": "text/html; charset=utf-8"}


def media_type(name: str) -> str:
    return MEDIA_TYPES.get(Path(name).suffix, "application/octet-stream")


@dataclass(frozen=True)
class StoredFile:
    """One file of a run as the store holds it, checked against what the run wrote."""

    name: str
    size: int
    sha256: str


class ArtifactStoreError(Exception):
    """A run's files could not be stored, or what the store holds differs from what the run wrote."""


class ArtifactStore(ABC):
    """A run writes into a local workspace; `store_run` makes its files durable and verified."""

    @abstractmethod
    def workspace(self, job_id: str, run: str) -> Path:
        """The local folder a run writes into."""

    def fresh_workspace(self, job_id: str, run: str) -> Path:
        """An empty workspace (a run released by its stopping worker may have left files)."""
        folder = self.workspace(job_id, run)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    @abstractmethod
    def store_run(self, job_id: str, run: str, folder: Path, names: Iterable[str]) -> list[StoredFile]:
        """Store the files `names` of `folder` (those that exist) as the run's, verify them, and
        return their sizes and checksums. Raises ArtifactStoreError when one cannot be stored."""

    def sync_log(self, job_id: str, run: str, folder: Path) -> None:
        """Make the log written so far readable from any host (called on each heartbeat)."""

    @abstractmethod
    def read_text(self, job_id: str, run: Optional[str], name: str) -> Optional[str]:
        """A stored file as text, None when absent; run None: the job's own folder (before attempts)."""

    @abstractmethod
    def read_range(self, job_id: str, run: Optional[str], name: str, offset: int = 0,
                   limit: Optional[int] = None) -> Optional[tuple[bytes, int]]:
        """(at most `limit` bytes of a stored file from `offset`, the file's size); None when absent.
        An offset past the end gives no bytes."""

    def iter_bytes(self, job_id: str, run: Optional[str], name: str, block: int = 1 << 20) -> Iterator[bytes]:
        """A stored file in blocks (for streaming it through the API)."""
        offset = 0
        while True:
            found = self.read_range(job_id, run, name, offset, block)
            if found is None or not found[0]:
                return
            yield found[0]
            offset += len(found[0])

    @abstractmethod
    def remove_other_runs(self, job_id: str, keep: str) -> None:
        """Best effort: remove the files of the runs that lost the job to `keep`."""

    @abstractmethod
    def remove_job(self, job_id: str) -> None:
        """Remove every file of the job."""

    def release_workspace(self, job_id: str, run: str) -> None:
        """The run has been stored: its workspace may go (a folder store keeps it: it is the store)."""

    @abstractmethod
    def check(self, write: bool = False) -> None:
        """Raise ArtifactStoreError, with a message that says what to fix, when the store cannot be
        read or (`write`) written. Quick: readiness probes and worker start-up call it."""

    def describe(self) -> str:
        return type(self).__name__


def stored_file(folder: Path, name: str) -> StoredFile:
    path = folder / name
    return StoredFile(name=name, size=path.stat().st_size, sha256=sha256_of(path))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_store(settings: "Settings") -> ArtifactStore:
    """The store the settings name: the bucket of ERQ_ARTIFACT_URL, else the folder ERQ_ARTIFACT_DIR."""
    if settings.s3_artifacts:
        from storage.s3 import S3Store

        return S3Store.from_settings(settings)
    from storage.folder import FolderStore

    return FolderStore(settings.artifact_dir)
