"""Request and response bodies."""
from __future__ import annotations

import datetime as dt
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from erq_core.config import MAX_BATCH_SIZE, MAX_CALIB_SIZE
from storage.models import JobStatus


class JobRequest(BaseModel):
    """The same fields, forms and defaults as `erq quantize`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=1000, examples=["deit_small"])
    dataset: str = Field(max_length=4096)
    w_bits: int = Field(4, ge=2, le=8)
    a_bits: int = Field(4, ge=2, le=8)
    coe: float = Field(10000.0, gt=0, le=1e12)
    calib_size: int = Field(32, ge=1, le=MAX_CALIB_SIZE)
    method: Literal["erq", "repq", "rtn"] = "erq"
    aqer: bool = True
    wqer: bool = True
    seed: int = Field(0, ge=0, le=2**31 - 1)
    evaluate: bool = True
    val_limit: Optional[int] = Field(None, ge=1, le=10_000_000)
    checkpoint: Optional[str] = Field(None, max_length=4096)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH_SIZE)


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
    params: dict[str, Any]
    metrics: Optional[dict[str, Any]]
    error: Optional[str]
    cancel_requested: bool = Field(description="the client asked to cancel; a running job stops at its next "
                                               "progress step and ends `cancelled`")
    attempts: int
    heartbeat_at: Optional[dt.datetime] = Field(
        description="last sign of life of the worker running the job; a running job silent for "
                    "ERQ_LEASE_SECONDS is re-queued or failed")
    created_at: dt.datetime
    started_at: Optional[dt.datetime]
    finished_at: Optional[dt.datetime]
    artifacts: list[ArtifactOut]


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: Optional[str]


class ModelOut(BaseModel):
    """One accepted value (or form) of a job's `model`."""

    alias: str = Field(description="what to send as `model`: an alias, a timm name, or a form such as "
                                   "hf-hub:ORG/NAME")
    timm_name: Optional[str] = Field(description="the timm architecture it builds (None for a form)")
    kind: Literal["alias", "timm", "hf-hub", "local-dir"]
    allowed: bool = Field(description="whether this service accepts it (ERQ_ALLOWED_MODELS)")
    note: Optional[str] = None
