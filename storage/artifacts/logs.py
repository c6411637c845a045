"""A job's log as the API reads it (GET /v1/jobs/ID/log and the event streams): from its published
run, or from its latest run while it has none (from a bucket: as of the run's last heartbeat)."""
from __future__ import annotations

from typing import Optional

from storage.artifacts.interface import ArtifactStore
from storage.artifacts.names import LOG_NAME, run_name


def log_run(published_run: Optional[str], attempts: int) -> Optional[str]:
    """The run whose log a job shows; None: the job's own folder (jobs from before attempt folders).
    A run publishes only while it is the job's current attempt (jobs.finish), so this is always the
    run of attempt number `attempts`."""
    return published_run or (run_name(attempts) if attempts else None)


def read_log(store: ArtifactStore, job_id: str, run: Optional[str], offset: int,
             limit: Optional[int] = None) -> tuple[bytes, int]:
    """(the log's bytes from `offset`, at most `limit`; its size) from `run`, or from the job's own
    folder (jobs from before attempts). A missing log is empty."""
    for candidate in dict.fromkeys((run, None)):
        found = store.read_range(job_id, candidate, LOG_NAME, offset, limit)
        if found is not None:
            return found
    return b"", 0


def whole_utf8(data: bytes) -> bytes:
    """`data` without a trailing, incomplete UTF-8 character (a line being written): it comes next time."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the start of the last character
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return data if need <= back else data[:-back]
    return data
