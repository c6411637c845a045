"""The artifact store: where a job's files live, shared by the API (downloads, logs) and the workers
(which store a run's files). The package: the interface every store implements (interface.py), the
files' names (names.py), two backends, a folder (folder.py, the default) and an S3-compatible
bucket (s3.py, with ERQ_ARTIFACT_URL=s3://BUCKET/PREFIX), and the factory (factory.py) that opens
the one the settings name. Modules here import their siblings, never this package: no circle.

Each run of a job writes only into its own workspace and is stored under its own name
(`JOB/attempt-N/`), so a run that lost its lease but is still writing never touches the files of
the run that replaced it. A run's files are stored and verified before the run records the job's
end; the run that records it names itself in the database (`jobs.published_run`, in the same
transaction as the sizes and checksums): that run's files are the job's artifacts.
"""
from storage.artifacts.factory import open_store
from storage.artifacts.interface import ArtifactStore, ArtifactStoreError, StoredFile, sha256_of, stored_file
from storage.artifacts.names import LOG_NAME, MEDIA_TYPES, PUBLISHED, media_type, run_name

__all__ = ["LOG_NAME", "MEDIA_TYPES", "PUBLISHED", "ArtifactStore", "ArtifactStoreError", "StoredFile", "media_type",
           "open_store", "run_name", "sha256_of", "stored_file"]
