"""Database tables. The schema changes only through Alembic migrations in migrations/.

Owners own jobs; an owner holds any number of API keys (each can be revoked on its own).
Every timestamp is a `UTCDateTime`: stored as UTC, always read back timezone-aware.
"""
from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any, Optional

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Enum, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.expression import FunctionElement, literal
from sqlalchemy.types import TypeDecorator


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)
TERMINAL_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


def utcnow() -> dt.datetime:
    """This process's clock. Leases use the database's clock instead (`db_now`)."""
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every database (SQLite keeps no offset: values are stored
    as naive UTC and given their offset back when read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[dt.datetime], dialect) -> Optional[dt.datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: timestamps must carry their timezone")
        value = value.astimezone(dt.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Optional[dt.datetime], dialect) -> Optional[dt.datetime]:
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


class db_now(FunctionElement):
    """The database server's current time (plus `seconds`, which may be negative), so that every
    process compares leases on one clock, whatever the clocks of the worker machines say."""

    type = UTCDateTime()
    inherit_cache = True

    def __init__(self, seconds: float = 0):
        super().__init__(literal(float(seconds), Float()))


@compiles(db_now)
def _db_now_default(element: db_now, compiler, **kw) -> str:
    return f"(statement_timestamp() + make_interval(secs => {compiler.process(element.clauses, **kw)}))"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler, **kw) -> str:
    # The same text form SQLAlchemy stores (microseconds), so that values compare as strings.
    offset = compiler.process(element.clauses, **kw)
    return f"(strftime('%Y-%m-%d %H:%M:%f', 'now', {offset} || ' seconds') || '000')"


# A nullable JSON column stores Python None as SQL NULL, not as the JSON text 'null': otherwise
# `column.is_not(None)` matches every row, those without a value included.
NullableJSON = JSON(none_as_null=True)


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSON}


class Owner(Base):
    __tablename__ = "owners"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # Signs the owner's webhooks (HMAC-SHA256); shown once by `erq admin webhook-secret OWNER`.
    webhook_secret: Mapped[Optional[str]] = mapped_column(String(100), nullable=True)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id"), index=True)
    # The key's first 12 characters, the only part kept in clear (None for keys made before prefixes).
    prefix: Mapped[Optional[str]] = mapped_column(String(12), unique=True, nullable=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the key
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[Optional[dt.datetime]] = mapped_column(nullable=True)

    owner: Mapped[Owner] = relationship()


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_owner_idempotency"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id"), index=True)
    key_id: Mapped[Optional[int]] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)  # the key that submitted
    idempotency_key: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    request_sha256: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)  # of the submitted body
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, create_constraint=False, length=16,
             values_callable=lambda statuses: [s.value for s in statuses]),
        index=True, default=JobStatus.QUEUED)
    stage: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[Optional[dict[str, Any]]] = mapped_column(NullableJSON, nullable=True)
    error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    # Stable machine-readable reason beside `error` (README, "Error codes"); None while the job has no error.
    error_code: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    # The attempt folder (under the job's folder) whose files are the job's artifacts.
    published_run: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    heartbeat_at: Mapped[Optional[dt.datetime]] = mapped_column(nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[Optional[dt.datetime]] = mapped_column(nullable=True)
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(nullable=True, index=True)

    # When the retention sweep (ERQ_ARTIFACT_TTL_DAYS) removed the job's files; downloads answer 410 after.
    artifacts_expired_at: Mapped[Optional[dt.datetime]] = mapped_column(nullable=True)
    # The client's labels: a small string map (bounds in service/schemas.py), returned and filterable.
    job_metadata: Mapped[Optional[dict[str, Any]]] = mapped_column("metadata", NullableJSON, nullable=True)
    # {"url", "events"}: where to POST the job when one of its events happens (storage/webhooks.py).
    webhook: Mapped[Optional[dict[str, Any]]] = mapped_column(NullableJSON, nullable=True)
    # The last status the webhook sweep has seen (and announced, if subscribed).
    webhook_seen_status: Mapped[Optional[str]] = mapped_column(String(16), nullable=True)

    artifacts: Mapped[list["Artifact"]] = relationship(back_populates="job", order_by="Artifact.name",
                                                       cascade="all, delete-orphan")
    deliveries: Mapped[list["WebhookDelivery"]] = relationship(back_populates="job", order_by="WebhookDelivery.id",
                                                               cascade="all, delete-orphan")


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(BigInteger)  # checkpoints pass 2 GiB
    sha256: Mapped[str] = mapped_column(String(64))

    job: Mapped[Job] = relationship(back_populates="artifacts")


class WebhookDelivery(Base):
    """One webhook event of a job, and its delivery: an outbox row written by the sweeper and sent by
    it, retried with backoff until delivered or given up (worker/webhook_delivery.py)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    event: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(String(2048))
    body: Mapped[str] = mapped_column(Text)  # the job's JSON when the event happened; each attempt signs it anew
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # When the next attempt is due; while an attempt runs, when its lease ends; None: done.
    next_attempt_at: Mapped[Optional[dt.datetime]] = mapped_column(nullable=True, index=True)
    # The token of the attempt in flight: only that attempt records its outcome (None: none in flight).
    lease: Mapped[Optional[str]] = mapped_column(String(32), nullable=True)
    last_attempt_at: Mapped[Optional[dt.datetime]] = mapped_column(nullable=True)  # when the latest attempt started
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    status_code: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)  # of the last attempt
    last_error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    delivered_at: Mapped[Optional[dt.datetime]] = mapped_column(nullable=True)
    given_up_at: Mapped[Optional[dt.datetime]] = mapped_column(nullable=True)

    job: Mapped[Job] = relationship(back_populates="deliveries")


class UploadKind(StrEnum):
    DATASET = "dataset"
    MODEL = "model"


class Upload(Base):
    """A dataset or a model an owner uploaded (storage/uploads.py). Its archive lives in the artifact
    store under uploads/OWNER/SHA256: content-addressed, so the same bytes uploaded twice by one owner
    are one upload. A job names it as `dataset:ID` or `upload:ID`."""

    __tablename__ = "uploads"
    __table_args__ = (UniqueConstraint("owner_id", "kind", "sha256", name="uq_uploads_owner_kind_sha256"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id"), index=True)
    kind: Mapped[UploadKind] = mapped_column(
        Enum(UploadKind, native_enum=False, create_constraint=False, length=16,
             values_callable=lambda kinds: [k.value for k in kinds]))
    sha256: Mapped[str] = mapped_column(String(64), index=True)  # of the stored archive
    size: Mapped[int] = mapped_column(BigInteger)  # of the stored archive: what the owner's quota counts
    unpacked_size: Mapped[int] = mapped_column(BigInteger)  # what a worker's cache holds once extracted
    archive_format: Mapped[str] = mapped_column(String(16))  # zip, tar or tar.gz
    filename: Mapped[Optional[str]] = mapped_column(String(255), nullable=True)  # as the client named it
    # A dataset: train_images, val_images, classes; a model: architecture, num_classes, parameters.
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    # Submitting a job that names it renews it: ERQ_UPLOAD_TTL_DAYS counts from here.
    last_used_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
