"""The one settings object, read from ERQ_* environment variables (documented in the README).

ERQ_HOME is the one data folder: the embedded database, the embedded broker, the artifacts and
the first API key live under it unless ERQ_DATABASE_URL, ERQ_BROKER_URL or ERQ_ARTIFACT_DIR say
otherwise. Two services with different homes never share a queue.
"""
from __future__ import annotations

import fnmatch
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal, Optional

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from storage.db import PoolOptions

EMBEDDED_BROKER_PREFIXES = ("sqla+", "filesystem:", "memory:")
# ERQ_ALLOWED_MODELS when unset: the aliases (erq_core.registry.MODEL_ALIASES), local folders,
# which must lie under ERQ_DATA_ROOTS in any case, and the owner's uploaded models (upload:ID).
DEFAULT_ALLOWED_MODELS = "@aliases,local-dir:*,upload:*"
GiB = 1 << 30
OWNER_PLACEHOLDER = "{owner}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ERQ_", populate_by_name=True)

    # ERQ_VAR_DIR is the older name of ERQ_HOME and still works.
    home: Path = Field(Path("./var"), validation_alias=AliasChoices("ERQ_HOME", "ERQ_VAR_DIR"))
    database_url: Optional[str] = None  # default: sqlite:///HOME/erq.sqlite
    broker_url: Optional[str] = None  # default: sqla+sqlite:///HOME/broker.sqlite
    artifact_dir: Optional[Path] = None  # default: HOME/artifacts
    # Where artifacts are stored: unset (the folder ERQ_ARTIFACT_DIR), or s3://BUCKET/PREFIX.
    artifact_url: Optional[str] = None
    s3_endpoint_url: Optional[str] = None  # unset: AWS S3; e.g. http://seaweedfs:8333 for MinIO, Ceph, SeaweedFS
    s3_public_endpoint_url: Optional[str] = None  # what download redirects point to; default: ERQ_S3_ENDPOINT_URL
    s3_download: Literal["redirect", "stream"] = "redirect"
    s3_presign_seconds: int = Field(300, ge=10, le=7 * 24 * 3600)
    s3_multipart_mb: int = Field(64, ge=5, le=5 * 1024)  # files over this go up in parts of this size
    scratch_dir: Optional[Path] = None  # default: HOME/scratch, where runs write before their upload
    # Colon-separated folders jobs may read; `{owner}` in an entry stands for the job's owner's name
    # (/data/{owner}: each owner reads its own folder only; see data_roots_for).
    data_roots: str = "./tests/fixtures"
    allowed_models: str = DEFAULT_ALLOWED_MODELS  # comma-separated patterns; see model_allowed()
    # Queued + running jobs per owner (all its keys together). ERQ_MAX_ACTIVE_JOBS_PER_KEY is the older name.
    max_active_jobs_per_owner: int = Field(4, validation_alias=AliasChoices(
        "ERQ_MAX_ACTIVE_JOBS_PER_OWNER", "ERQ_MAX_ACTIVE_JOBS_PER_KEY"))
    max_job_seconds: int = 6 * 3600
    lease_seconds: int = 120  # a running job whose worker stays silent this long is re-queued or failed
    max_attempts: int = 2
    queue: str = "erq"
    device: Literal["auto", "cuda", "cpu"] = "auto"  # what a worker runs jobs on
    loader_workers: Optional[int] = Field(None, ge=0, le=64)  # data-loader processes per job; None: the engine's choice
    worker_health_file: Optional[Path] = None  # default: HOME/worker.alive
    # Ended jobs' files are removed this many days after the job ended (None: kept forever).
    artifact_ttl_days: Optional[float] = Field(None, gt=0)
    # Comma-separated host patterns (`hooks.example.com`, `*.example.com`, `10.0.0.5:8080`) webhooks may
    # call; empty: webhooks are off.
    webhook_allowed_hosts: str = ""
    # The server key webhook signing secrets are sealed under (storage/sealing.py); unset: HOME/secret-key.
    secret_key: Optional[str] = Field(None, repr=False)
    webhook_retry_seconds: float = Field(3600, gt=0)  # a failing delivery is retried this long after its event
    webhook_timeout_seconds: float = Field(5, gt=0, le=60)  # per attempt: connecting, sending, reading the answer
    # `erq api` / `erq serve` stopped (SIGTERM, Ctrl-C): event streams end at once, other requests get this long.
    api_grace_seconds: float = Field(10, gt=0, le=3600)
    # Uploaded datasets and models (POST /v1/datasets, /v1/models; storage/uploads.py): the archive bytes
    # one owner may keep, how long an unused upload is kept (None: until deleted), and the bounds every
    # archive is checked against before it is accepted (storage/archives.py).
    max_upload_bytes_per_owner: int = Field(20 * GiB, ge=0)
    upload_ttl_days: Optional[float] = Field(None, gt=0)
    upload_max_unpacked_bytes: int = Field(20 * GiB, ge=1)
    upload_max_files: int = Field(65_536, ge=1)
    upload_max_image_pixels: int = Field(50_000_000, ge=1)
    # A worker's local copies of uploads, by sha256 (worker/upload_cache.py), and their total size.
    upload_cache_dir: Optional[Path] = None  # default: HOME/upload-cache
    upload_cache_bytes: int = Field(50 * GiB, ge=0)
    # The API's database connections, per process: kept open, opened beyond those at busy times, and how
    # long a request waits for one before it answers 503 with Retry-After.
    database_pool_size: int = Field(5, ge=1, le=1000)
    database_pool_overflow: int = Field(10, ge=0, le=1000)
    database_pool_timeout_seconds: float = Field(10, gt=0, le=300)
    # GET /metrics: `off` answers 404; with a token, scrapers send `Authorization: Bearer TOKEN`; the figures
    # read from the database are reused this long (one query per period, whatever the number of scrapers).
    metrics: Literal["on", "off"] = "on"
    metrics_token: Optional[SecretStr] = None
    metrics_cache_seconds: float = Field(5, ge=0, le=3600)
    # Per owner (all its keys together) and API process: authenticated requests a second, in bursts of up to
    # the burst, and event streams open at once (0: no limit). Past them: 429 with Retry-After.
    owner_requests_per_second: float = Field(20, ge=0)
    owner_request_burst: int = Field(40, ge=1)
    max_event_streams_per_owner: int = Field(10, ge=0)

    @model_validator(mode="after")
    def _fill_from_home(self) -> "Settings":
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.home / 'erq.sqlite'}"
        if self.broker_url is None:
            self.broker_url = f"sqla+sqlite:///{self.home / 'broker.sqlite'}"
        if self.artifact_dir is None:
            self.artifact_dir = self.home / "artifacts"
        if self.worker_health_file is None:
            self.worker_health_file = self.home / "worker.alive"
        if self.scratch_dir is None:
            self.scratch_dir = self.home / "scratch"
        if self.upload_cache_dir is None:
            self.upload_cache_dir = self.home / "upload-cache"
        if not self.artifact_url:
            self.artifact_url = None
        elif not self.artifact_url.startswith("s3://") or not self.artifact_url[5:].strip("/"):
            raise ValueError(f"ERQ_ARTIFACT_URL={self.artifact_url!r} is not an s3://BUCKET[/PREFIX] URL; "
                             "leave it unset to keep artifacts in the folder ERQ_ARTIFACT_DIR")
        return self

    def data_roots_for(self, owner: str) -> list[Path]:
        """The folders a job of `owner` (its name) may read: the shared roots and the per-owner entries
        with `{owner}` replaced. An owner whose name is not one plain folder name gets no per-owner root."""
        entries = [p for p in self.data_roots.split(":") if p.strip()]
        usable = _plain_folder_name(owner)
        return [Path(p.replace(OWNER_PLACEHOLDER, owner)).resolve() for p in entries
                if OWNER_PLACEHOLDER not in p or usable]

    @property
    def database_pool(self) -> PoolOptions:
        return PoolOptions(self.database_pool_size, self.database_pool_overflow, self.database_pool_timeout_seconds)

    @property
    def s3_artifacts(self) -> bool:
        return self.artifact_url is not None

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith(EMBEDDED_BROKER_PREFIXES)

    @property
    def allowed_model_patterns(self) -> list[str]:
        return [p.strip() for p in self.allowed_models.split(",") if p.strip()]

    def model_allowed(self, spec: str, aliases: frozenset[str] | set[str]) -> bool:
        """Whether ERQ_ALLOWED_MODELS admits `spec`: shell patterns (`hf-hub:my-org/*`, `deit_*`,
        `local-dir:*`), and `@aliases` for every alias of the model registry."""
        for pattern in self.allowed_model_patterns:
            if pattern == "@aliases":
                if spec in aliases:
                    return True
            elif fnmatch.fnmatchcase(spec, pattern):
                return True
        return False


def _plain_folder_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\x00" not in name and name not in (".", "..")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


class LocalFolderError(Exception):
    """A folder the settings name cannot be created (a file is in the way, no permission, ...)."""


def prepare_local_folders(settings: Optional[Settings] = None) -> None:
    """Create the home (0700) and artifact folders, the SQLite folders the URLs point into and their
    database files (0600); tighten them, and the key files in the home, when they exist with looser modes."""
    from storage.private_files import API_KEY_FILE, SECRET_KEY_FILE, private_file, private_folder, private_sqlite_file

    settings = settings or get_settings()
    _make_folder(settings.home, "ERQ_HOME")
    _make_private(settings.home, "ERQ_HOME", private_folder)
    for name in (API_KEY_FILE, SECRET_KEY_FILE):
        if (settings.home / name).is_file():
            _make_private(settings.home / name, "ERQ_HOME", private_file)
    if not settings.s3_artifacts:
        _make_folder(settings.artifact_dir, "ERQ_ARTIFACT_DIR")
    for variable, url in (("ERQ_DATABASE_URL", settings.database_url), ("ERQ_BROKER_URL", settings.broker_url)):
        if "sqlite:///" in url:
            _make_folder(Path(url.split("sqlite:///", 1)[1]).parent, variable)
            _make_private(url, variable, private_sqlite_file)


def _make_folder(path: Path, variable: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalFolderError(f"cannot create the folder {path} (from {variable} or ERQ_HOME): "
                               f"{exc.strerror or exc}") from None


def _make_private(target, variable: str, make: Callable) -> None:
    try:
        make(target)
    except OSError as exc:
        raise LocalFolderError(f"cannot make {target} readable by this user alone (0700 / 0600; from {variable}): "
                               f"{exc.strerror or exc}") from None
