"""The interface every artifact store implements, and what storing a run returns."""
from __future__ import annotations

import hashlib
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from storage.artifacts.download import Download, DownloadRequest


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

    @abstractmethod
    def download(self, job_id: str, run: Optional[str], name: str, request: DownloadRequest) -> Download:
        """How to answer a client's download of a stored file: the one way the API reads an artifact.
        Raises ArtifactGone when the file is not there, RangeNotSatisfiable for a range past its end,
        ArtifactStoreError when the store cannot be read."""

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

