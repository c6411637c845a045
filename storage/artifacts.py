"""The artifact store: one folder per job under ERQ_ARTIFACT_DIR, files checksummed when complete."""
from __future__ import annotations

import hashlib
from pathlib import Path

LOG_NAME = "job.log"
PUBLISHED = ("quantized.safetensors", "config.json", "metrics.json", LOG_NAME)


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def path(self, job_id: str, name: str) -> Path:
        if name not in PUBLISHED:
            raise KeyError(name)
        return self.job_dir(job_id) / name

    def log_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / LOG_NAME


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
