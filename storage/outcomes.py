"""A run's outcome, as it travels from the worker to the job's state (storage/jobs.py): why the run
ended (an enum, not a pseudo-status string) and what it ended with."""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Optional

from storage.models import JobStatus


class Reason(StrEnum):
    """Why a run ended (or must stop: jobs.report_progress answers LOST or CANCELLED)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"  # the job was re-queued behind this run (a late heartbeat): another run owns it now
    HANDED_BACK = "handed_back"  # its worker is shutting down: the job goes back to the queue for another


ENDS_JOB = {Reason.SUCCEEDED: JobStatus.SUCCEEDED, Reason.FAILED: JobStatus.FAILED,
            Reason.CANCELLED: JobStatus.CANCELLED}


@dataclass(frozen=True)
class RunOutcome:
    reason: Reason
    error: Optional[str] = None
    error_code: Optional[str] = None  # the stable `error_code` of a failed (or cancelled) job
    metrics: Optional[dict] = None  # a succeeded run's

    @property
    def status(self) -> Optional[JobStatus]:
        """The status the job ends with; None: this run records no end (lost, handed back)."""
        return ENDS_JOB.get(self.reason)

    @classmethod
    def failed(cls, error: str, error_code: str) -> "RunOutcome":
        return cls(Reason.FAILED, error, error_code)
