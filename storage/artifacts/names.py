"""The files of a run, as the stores and the API name them."""
from __future__ import annotations

from pathlib import Path

LOG_NAME = "job.log"
PUBLISHED = ("quantized.safetensors", "config.json", "metrics.json", LOG_NAME, "model.onnx", "model-float64.onnx",
             "model-int8.onnx", "model-w4.onnx", "report.html")
MEDIA_TYPES = {".json": "application/json", ".log": "text/plain; charset=utf-8", ".html": "text/html; charset=utf-8"}


def run_name(attempt: int) -> str:
    return f"attempt-{attempt}"


def media_type(name: str) -> str:
    return MEDIA_TYPES.get(Path(name).suffix, "application/octet-stream")
