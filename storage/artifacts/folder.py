"""The folder artifact store (the default): ERQ_ARTIFACT_DIR/JOB/attempt-N/. A run writes straight
into its folder, so storing a run is reading back its files' sizes and checksums."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Optional

from storage.artifacts.download import ArtifactGone, Download, DownloadRequest
from storage.artifacts.interface import ArtifactStore, ArtifactStoreError, StoredFile, stored_file
from storage.artifacts.names import PUBLISHED


class FolderStore(ArtifactStore):
    def __init__(self, root: Path):
        self.root = Path(root)

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def run_dir(self, job_id: str, run: Optional[str]) -> Path:
        """The folder of one run; `None` is the job folder itself (jobs from before attempt folders)."""
        return self.job_dir(job_id) / run if run else self.job_dir(job_id)

    def fresh_run_dir(self, job_id: str, run: str) -> Path:
        return self.fresh_workspace(job_id, run)

    def workspace(self, job_id: str, run: str) -> Path:
        return self.run_dir(job_id, run)

    def path(self, job_id: str, run: Optional[str], name: str) -> Path:
        if name not in PUBLISHED:
            raise KeyError(name)
        return self.run_dir(job_id, run) / name

    def store_run(self, job_id: str, run: str, folder: Path, names: Iterable[str]) -> list[StoredFile]:
        return [stored_file(folder, name) for name in names if (folder / name).is_file()]

    def read_text(self, job_id: str, run: Optional[str], name: str) -> Optional[str]:
        path = self.run_dir(job_id, run) / name
        return path.read_text(errors="replace") if path.is_file() else None

    def read_range(self, job_id: str, run: Optional[str], name: str, offset: int = 0,
                   limit: Optional[int] = None) -> Optional[tuple[bytes, int]]:
        try:
            with open(self.run_dir(job_id, run) / name, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if offset >= size:
                    return b"", size
                handle.seek(offset)
                return handle.read(-1 if limit is None else limit), size
        except FileNotFoundError:
            return None

    def download(self, job_id: str, run: Optional[str], name: str, request: DownloadRequest) -> Download:
        path = self.path(job_id, run, name)
        try:
            size = path.stat().st_size
            if request.headers_only:
                return Download(size)
            byte_range = request.range.within(size) if request.range else None
            handle = open(path, "rb")  # opened now: a file removed while it is sent is still sent whole
        except FileNotFoundError:
            raise ArtifactGone(str(path)) from None
        start, length = (byte_range.start, byte_range.length) if byte_range else (0, size)
        return Download(size, byte_range, chunks=_blocks(handle, start, length))

    def remove_other_runs(self, job_id: str, keep: str) -> None:
        for folder in self.job_dir(job_id).glob("attempt-*"):
            if folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)

    def remove_job(self, job_id: str) -> None:
        """Remove every file of the job (deletion, retention). Raises OSError when some remain."""
        shutil.rmtree(self.job_dir(job_id), onerror=_ignore_missing)

    def check(self, write: bool = False) -> None:
        if not self.root.is_dir():
            raise ArtifactStoreError(f"the artifact folder {self.root} does not exist or is not a folder "
                                     "(set ERQ_ARTIFACT_DIR to a folder this process can use)")
        action = "write to" if write else "read"
        try:
            with os.scandir(self.root) as entries:
                next(entries, None)
            if write:
                with tempfile.NamedTemporaryFile(dir=self.root, prefix=".erq-write-check-") as probe:
                    probe.write(b"ok")
                    probe.flush()
        except OSError as exc:
            raise ArtifactStoreError(f"cannot {action} the artifact folder {self.root}: {exc.strerror or exc} "
                                     "(check ERQ_ARTIFACT_DIR and the folder's owner, permissions and free "
                                     "space)") from exc

    def describe(self) -> str:
        return f"the folder {self.root}"


def _blocks(handle: BinaryIO, start: int, length: int, block: int = 1 << 20) -> Iterator[bytes]:
    with handle:
        handle.seek(start)
        while length > 0 and (data := handle.read(min(block, length))):
            length -= len(data)
            yield data


def _ignore_missing(function, path, exc_info) -> None:
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]
