"""The artifact store: a folder per job under ERQ_ARTIFACT_DIR, and in it a folder per attempt.

Each run of a job writes only into its own attempt folder (`JOB/attempt-N/`), so a run that lost
its lease but is still writing never touches the files of the run that replaced it. The run that
records the job's end names its folder in the database (`jobs.published_run`, in the same
transaction as the checksums): that folder's files are the job's artifacts.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Optional

LOG_NAME = "job.log"
PUBLISHED = ("quantized.safetensors", "config.json", "metrics.json", LOG_NAME)


def run_name(attempt: int) -> str:
    return f"attempt-{attempt}"


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def run_dir(self, job_id: str, run: Optional[str]) -> Path:
        """The folder of one run; `None` is the job folder itself (jobs from before attempt folders)."""
        return self.job_dir(job_id) / run if run else self.job_dir(job_id)

    def fresh_run_dir(self, job_id: str, run: str) -> Path:
        """An empty folder for a run (a run released by its stopping worker may have left files)."""
        folder = self.run_dir(job_id, run)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def path(self, job_id: str, run: Optional[str], name: str) -> Path:
        if name not in PUBLISHED:
            raise KeyError(name)
        return self.run_dir(job_id, run) / name

    def remove_job(self, job_id: str) -> None:
        """Remove every file of the job (deletion, retention). Raises OSError when some remain."""
        shutil.rmtree(self.job_dir(job_id), onerror=_ignore_missing)

    def remove_other_runs(self, job_id: str, keep: str) -> None:
        """Best effort: clear the folders of runs that lost the job to `keep`."""
        for folder in self.job_dir(job_id).glob("attempt-*"):
            if folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _ignore_missing(function, path, exc_info) -> None:
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]
