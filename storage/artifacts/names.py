"""The files of a run, as the stores and the API name them."""
from __future__ import annotations

from pathlib import Path

from erq_core.files import EXPORT_FILE_NAMES, REPORT_FILE, RESULT_FOLDER

LOG_NAME = "job.log"
# what a succeeded run publishes: the engine's files (erq_core/files.py, named there once) and its log
PUBLISHED = (*RESULT_FOLDER, LOG_NAME, *EXPORT_FILE_NAMES.values(), REPORT_FILE)
MEDIA_TYPES = {".json": "application/json", ".log": "text/plain; charset=utf-8", ".html": "text/html; charset=utf-8"}


def run_name(attempt: int) -> str:
    return f"attempt-{attempt}"


def media_type(name: str) -> str:
    return MEDIA_TYPES.get(Path(name).suffix, "application/octet-stream")
