"""Where the archives of uploads live: beside the jobs' artifacts, in the same store.

- folder store: ERQ_ARTIFACT_DIR/uploads/OWNER/SHA256
- S3 store: PREFIX/uploads/OWNER/SHA256 in the bucket of ERQ_ARTIFACT_URL (sha256 as object
  metadata, checked after the upload like a run's files)

Keys are per owner and content: one owner's same bytes are one object, and removing one owner's
upload never touches another's. A worker fetches an archive by this key into its cache
(worker/upload_cache.py): no shared file system is needed with S3.
"""
from __future__ import annotations

import os
import shutil
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from storage.artifacts import ArtifactStoreError

if TYPE_CHECKING:
    from storage.settings import Settings

FOLDER = "uploads"


class UploadStore(ABC):
    @abstractmethod
    def put(self, owner_id: int, sha256: str, path: Path) -> None:
        """Store the file at `path` as the owner's archive `sha256` (the same bytes again: harmless).
        Raises ArtifactStoreError."""

    @abstractmethod
    def exists(self, owner_id: int, sha256: str) -> bool:
        """Whether the archive is stored. Raises ArtifactStoreError when the store cannot say."""

    @abstractmethod
    def fetch(self, owner_id: int, sha256: str, dest: Path) -> None:
        """Copy the archive to the local file `dest`. Raises FileNotFoundError when it is not stored,
        ArtifactStoreError when the store cannot be read."""

    @abstractmethod
    def remove(self, owner_id: int, sha256: str) -> None:
        """Remove the archive (absent: nothing to do). Raises ArtifactStoreError."""


class FolderUploads(UploadStore):
    def __init__(self, artifact_dir: Path):
        self.root = Path(artifact_dir) / FOLDER

    def path(self, owner_id: int, sha256: str) -> Path:
        return self.root / str(owner_id) / sha256

    def put(self, owner_id: int, sha256: str, path: Path) -> None:
        target = self.path(owner_id, sha256)
        partial = target.with_name(f".{sha256}.{uuid.uuid4().hex}.part")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, partial)
            os.replace(partial, target)  # whole or not at all
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise ArtifactStoreError(f"cannot store the upload in {target.parent}: {exc}") from exc

    def exists(self, owner_id: int, sha256: str) -> bool:
        return self.path(owner_id, sha256).is_file()

    def fetch(self, owner_id: int, sha256: str, dest: Path) -> None:
        shutil.copyfile(self.path(owner_id, sha256), dest)

    def remove(self, owner_id: int, sha256: str) -> None:
        try:
            self.path(owner_id, sha256).unlink(missing_ok=True)
        except OSError as exc:
            raise ArtifactStoreError(f"cannot remove the upload {self.path(owner_id, sha256)}: {exc}") from exc


class S3Uploads(UploadStore):
    def __init__(self, settings: "Settings"):
        from storage.artifacts.s3 import S3Store

        self.store = S3Store.from_settings(settings)  # its client, transfer settings and checks

    def key(self, owner_id: int, sha256: str) -> str:
        return "/".join(part for part in (self.store.prefix, FOLDER, str(owner_id), sha256) if part)

    def put(self, owner_id: int, sha256: str, path: Path) -> None:
        from storage.artifacts.s3 import S3_ERRORS, SHA256_KEY, local_digest

        key, digest = self.key(owner_id, sha256), local_digest(path)
        try:
            self.store.client.upload_file(str(path), self.store.bucket, key, Config=self.store.transfer,
                                          ExtraArgs={"Metadata": {SHA256_KEY: digest.sha256},
                                                     "ContentType": "application/octet-stream"})
        except S3_ERRORS as exc:
            raise ArtifactStoreError(f"cannot store the upload as s3://{self.store.bucket}/{key}: {exc}") from exc
        self.store.verify(key, digest)

    def exists(self, owner_id: int, sha256: str) -> bool:
        from storage.artifacts.s3 import MISSING, S3_ERRORS, error_code

        try:
            self.store.client.head_object(Bucket=self.store.bucket, Key=self.key(owner_id, sha256))
            return True
        except S3_ERRORS as exc:
            if error_code(exc) in MISSING:
                return False
            raise ArtifactStoreError(f"cannot read s3://{self.store.bucket}/{self.key(owner_id, sha256)}: "
                                     f"{exc}") from exc

    def fetch(self, owner_id: int, sha256: str, dest: Path) -> None:
        from storage.artifacts.s3 import MISSING, S3_ERRORS, error_code

        key = self.key(owner_id, sha256)
        try:
            self.store.client.download_file(self.store.bucket, key, str(dest), Config=self.store.transfer)
        except S3_ERRORS as exc:
            if error_code(exc) in MISSING:
                raise FileNotFoundError(f"s3://{self.store.bucket}/{key}") from exc
            raise ArtifactStoreError(f"cannot read s3://{self.store.bucket}/{key}: {exc}") from exc

    def remove(self, owner_id: int, sha256: str) -> None:
        from storage.artifacts.s3 import S3_ERRORS

        try:
            self.store.client.delete_object(Bucket=self.store.bucket, Key=self.key(owner_id, sha256))
        except S3_ERRORS as exc:
            raise ArtifactStoreError(f"cannot remove s3://{self.store.bucket}/{self.key(owner_id, sha256)}: "
                                     f"{exc}") from exc


def open_upload_store(settings: "Settings") -> UploadStore:
    """The uploads' place in the store the settings name (ERQ_ARTIFACT_URL, else ERQ_ARTIFACT_DIR)."""
    return S3Uploads(settings) if settings.s3_artifacts else FolderUploads(settings.artifact_dir)
