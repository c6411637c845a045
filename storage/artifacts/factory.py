"""The store the settings name."""
from __future__ import annotations

from typing import TYPE_CHECKING

from storage.artifacts.folder import FolderStore
from storage.artifacts.interface import ArtifactStore

if TYPE_CHECKING:
    from storage.settings import Settings


def open_store(settings: "Settings") -> ArtifactStore:
    """The bucket of ERQ_ARTIFACT_URL, else the folder ERQ_ARTIFACT_DIR."""
    if settings.s3_artifacts:
        from storage.artifacts.s3 import S3Store  # boto3 only where a bucket is used

        return S3Store.from_settings(settings)
    return FolderStore(settings.artifact_dir)
