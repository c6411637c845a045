"""Request and response bodies."""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model
from pydantic_core import PydanticUndefined

from erq_core.config import FieldSpec
from erq_core.config import fields as config_fields
from storage.models import JobStatus
from storage.webhooks import DEFAULT_EVENTS as DEFAULT_WEBHOOK_EVENTS
from storage.webhooks import EVENTS as WEBHOOK_EVENTS


# Forms of a job's fields that only the service accepts (uploads; storage/uploads.py).
SERVICE_FORMS = {"dataset": "; or `dataset:ID`, a dataset uploaded with POST /v1/datasets",
                 "model": "; or `upload:ID`, a model uploaded with POST /v1/models"}


def _job_field(spec: FieldSpec) -> tuple[Any, Any]:
    """The pydantic (annotation, Field) of one ErqConfig field, with the same bounds and help."""
    option = spec.option
    annotation: Any = spec.base_type
    if option.choices is not None:
        annotation = Literal[option.choices]  # type: ignore[valid-type]
    if spec.is_sequence:
        annotation = list[annotation]  # type: ignore[valid-type]
    if spec.optional and not option.required:
        annotation = Optional[annotation]
    default: Any = ... if option.required or spec.default is dataclasses.MISSING else spec.default
    if isinstance(default, tuple):
        default = list(default)
    constraints = {name: getattr(option, name) for name in ("ge", "gt", "le", "max_length")
                   if getattr(option, name) is not None}
    if spec.base_type is int:
        constraints = {k: int(v) if k != "max_length" else v for k, v in constraints.items()}
    return annotation, Field(default, description=option.help + SERVICE_FORMS.get(spec.name, ""), **constraints)


JobRequest = create_model(
    "JobRequest",
    __config__=ConfigDict(extra="forbid"),
    __doc__="The job's parameters: the same fields, forms, defaults and bounds as `erq quantize` "
            "(both are generated from erq_core.config.ErqConfig).",
    **{spec.name: _job_field(spec) for spec in config_fields() if spec.option.rest},
)


METADATA_MAX_PAIRS, METADATA_KEY_LENGTH, METADATA_VALUE_LENGTH = 16, 64, 512
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=METADATA_KEY_LENGTH,
                                               pattern=r"^[A-Za-z0-9_.:-]+$")]
MetadataValue = Annotated[str, StringConstraints(max_length=METADATA_VALUE_LENGTH)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(
    max_length=METADATA_MAX_PAIRS,
    description=f"your labels for the job: at most {METADATA_MAX_PAIRS} pairs, keys of 1 to {METADATA_KEY_LENGTH} "
                f"characters among letters, digits and `_.:-`, string values of at most {METADATA_VALUE_LENGTH} "
                "characters; returned with the job, and `GET /v1/jobs?metadata[KEY]=VALUE` filters on them")]


WebhookEvent = Literal[WEBHOOK_EVENTS]  # type: ignore[valid-type]


class WebhookIn(BaseModel):
    """Where to POST the job (signed with the owner's secret) when one of `events` happens."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=2048, description="http(s) URL on a host ERQ_WEBHOOK_ALLOWED_HOSTS allows")
    events: list[WebhookEvent] = Field(list(DEFAULT_WEBHOOK_EVENTS), min_length=1, max_length=len(WEBHOOK_EVENTS),
                                       description="the statuses to be told about")


class WebhookDeliveryOut(BaseModel):
    id: int
    event: str
    state: Literal["pending", "delivered", "given_up"]
    attempts: int
    status_code: Optional[int] = Field(description="the receiver's answer to the last attempt")
    error: Optional[str] = Field(description="why the last attempt failed")
    created_at: Optional[dt.datetime]
    last_attempt_at: Optional[dt.datetime] = Field(description="when the latest attempt started")
    delivered_at: Optional[dt.datetime]
    given_up_at: Optional[dt.datetime]


class WebhookOut(WebhookIn):
    deliveries: list[WebhookDeliveryOut] = Field(description="one per event that happened, oldest first")


class JobSubmission(JobRequest):
    """The body of `POST /v1/jobs`: the job's parameters, and what is not a parameter of the run."""

    metadata: Optional[Metadata] = None
    webhook: Optional[WebhookIn] = None


def _stored_field(spec: FieldSpec) -> tuple[Any, Any]:
    """The type of a parameter as a job shows it: the request's, without bounds (a job stored
    before a bound changed still reads), defaults filled for fields added since."""
    annotation, field = _job_field(spec)
    default = field.default if field.default is not PydanticUndefined else ...
    return annotation, Field(default, description=spec.option.help + SERVICE_FORMS.get(spec.name, ""))


JobParams = create_model(
    "JobParams",
    __config__=ConfigDict(extra="allow"),
    __doc__="The job's parameters as it runs them (paths resolved, defaults filled in).",
    **{spec.name: _stored_field(spec) for spec in config_fields() if spec.option.rest},
)


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str
    url: str


class JobOut(BaseModel):
    id: str
    status: JobStatus
    stage: Optional[str]
    progress: float
    params: JobParams
    metrics: Optional[dict[str, Any]]
    metadata: Optional[dict[str, str]] = Field(None, description="the labels sent with the job")
    error: Optional[str]
    error_code: Optional[str] = Field(None, description="a failed or cancelled job's stable reason code "
                                                        "(README, \"Error codes\")")
    cancel_requested: bool = Field(description="the client asked to cancel; a running job stops at its next "
                                               "progress step and ends `cancelled`")
    attempts: int
    heartbeat_at: Optional[dt.datetime] = Field(
        description="last sign of life of the worker running the job; a running job silent for "
                    "ERQ_LEASE_SECONDS is re-queued or failed")
    created_at: dt.datetime
    started_at: Optional[dt.datetime]
    finished_at: Optional[dt.datetime]
    artifacts_expired_at: Optional[dt.datetime] = Field(
        None, description="when the retention sweep (ERQ_ARTIFACT_TTL_DAYS) removed the job's files; its "
                          "downloads answer 410 from then on")
    artifacts: list[ArtifactOut]
    webhook: Optional[WebhookOut] = None


class JobList(BaseModel):
    jobs: list[JobOut]
    has_more: bool = Field(False, description="more jobs match: ask again with `after` (the last job's id) or "
                                              "`cursor`")
    next_cursor: Optional[str] = Field(description="send as `cursor` for the next page; None on the last")


class ModelOut(BaseModel):
    """One accepted value (or form) of a job's `model`."""

    alias: str = Field(description="what to send as `model`: an alias, a timm name, or a form such as "
                                   "hf-hub:ORG/NAME")
    timm_name: Optional[str] = Field(description="the timm architecture it builds (None for a form)")
    kind: Literal["alias", "timm", "hf-hub", "local-dir", "upload"]
    allowed: bool = Field(description="whether this service accepts it (ERQ_ALLOWED_MODELS)")
    note: Optional[str] = None


class LogChunk(BaseModel):
    """A piece of a job's log (`GET /v1/jobs/{id}/log?offset=N` with `Accept: application/json`)."""

    offset: int = Field(description="the byte offset `text` starts at")
    next_offset: int = Field(description="send this as `offset` to continue")
    complete: bool = Field(description="the job has ended and the log has been sent to its end")
    text: str


class UploadOut(BaseModel):
    """What every uploaded dataset or model shows."""

    id: str
    spec: str = Field(description="what a job sends to use it: `dataset:ID` as its `dataset`, `upload:ID` as "
                                  "its `model`")
    sha256: str = Field(description="of the stored archive: the same bytes uploaded again are this upload")
    size: int = Field(description="bytes of the stored archive (what ERQ_MAX_UPLOAD_BYTES_PER_OWNER counts)")
    unpacked_size: int = Field(description="bytes once extracted")
    filename: Optional[str] = Field(None, description="the name the client gave the file")
    created_at: dt.datetime
    last_used_at: dt.datetime = Field(description="when it was uploaded or last named by a submitted job")
    expires_at: Optional[dt.datetime] = Field(None, description="with ERQ_UPLOAD_TTL_DAYS: when it is removed "
                                                                "unless a job names it before")


class DatasetOut(UploadOut):
    """An uploaded ImageFolder dataset."""

    train_images: int
    val_images: int = Field(description="0 for a dataset with train/ only (jobs on it need `evaluate: false`)")
    classes: list[str] = Field(description="the class folders, in label order")


class UploadedModelOut(UploadOut):
    """An uploaded timm model folder (config.json + model.safetensors)."""

    architecture: str = Field(description="the timm architecture of config.json")
    num_classes: Optional[int]
    parameters: int = Field(description="elements of every tensor of model.safetensors")


class DatasetList(BaseModel):
    datasets: list[DatasetOut]
    has_more: bool = Field(False, description="more match: ask again with `after` (the last id) or `cursor`")
    next_cursor: Optional[str] = Field(description="send as `cursor` for the next page; None on the last")


class UploadedModelList(BaseModel):
    models: list[UploadedModelOut]
    has_more: bool = Field(False, description="more match: ask again with `after` (the last id) or `cursor`")
    next_cursor: Optional[str] = Field(description="send as `cursor` for the next page; None on the last")
