"""Submit-time checks of a job: parameters, and paths that must lie under ERQ_DATA_ROOTS."""
from __future__ import annotations

import os
from pathlib import Path

from erq_core.config import ErqConfig
from erq_core.errors import ConfigError
from erq_core.registry import MODEL_ALIASES, local_dir_path
from storage.settings import Settings


class InvalidJob(ValueError):
    """The job cannot run as submitted; the message says what to fix."""


def resolve_under_roots(raw: str, what: str, roots: list[Path]) -> Path:
    """The path with links resolved, if it lies under one of the roots; else InvalidJob."""
    if "\x00" in raw:
        raise InvalidJob(f"{what} contains a NUL byte")
    if not os.path.isabs(raw):
        raise InvalidJob(f"{what} {raw!r} must be an absolute path under ERQ_DATA_ROOTS")
    resolved = Path(raw).resolve()
    if not any(resolved == root or root in resolved.parents for root in roots):
        allowed = ", ".join(str(r) for r in roots) or "(none configured)"
        raise InvalidJob(f"{what} {raw!r} is outside the allowed data roots ({allowed}); set ERQ_DATA_ROOTS")
    return resolved


def check_model_allowed(spec: str, settings: Settings) -> None:
    if not settings.model_allowed(spec, frozenset(MODEL_ALIASES)):
        raise InvalidJob(f"model {spec!r} is not enabled on this service (ERQ_ALLOWED_MODELS="
                         f"{settings.allowed_models!r}); GET /v1/models lists what is accepted")


def validate_job(params: dict, settings: Settings) -> dict:
    """Check a job's parameters; return them with paths resolved. Raises InvalidJob."""
    try:
        ErqConfig.from_dict(params).validate()
    except ConfigError as exc:
        raise InvalidJob(str(exc)) from None
    check_model_allowed(params["model"], settings)
    roots = settings.roots
    params = dict(params)
    dataset = resolve_under_roots(params["dataset"], "dataset", roots)
    for split in ("train", "val"):
        if not (dataset / split).is_dir():
            raise InvalidJob(f"dataset {params['dataset']!r} has no {split!r} folder (expected an ImageFolder root "
                             "with train/<class>/<image> and val/<class>/<image>)")
    params["dataset"] = str(dataset)
    folder = local_dir_path(params["model"])
    if folder is not None:
        resolved = resolve_under_roots(folder, "local model folder", roots)
        if not (resolved / "config.json").is_file():
            raise InvalidJob(f"local model folder {folder!r} has no config.json")
        params["model"] = f"local-dir:{resolved}"
    if params.get("checkpoint"):
        checkpoint = resolve_under_roots(params["checkpoint"], "checkpoint", roots)
        if not checkpoint.is_file() or checkpoint.suffix != ".safetensors":
            raise InvalidJob(f"checkpoint {params['checkpoint']!r} must be an existing .safetensors file")
        params["checkpoint"] = str(checkpoint)
    return params
