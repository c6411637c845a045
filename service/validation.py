"""Submit-time checks of a job: parameters, and paths that must lie under ERQ_DATA_ROOTS."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from erq_core.config import ErqConfig, fields
from erq_core.errors import ConfigError
from erq_core.paths import under_any
from erq_core.registry import MODEL_ALIASES, local_dir_path
from sqlalchemy.orm import Session

from storage import uploads
from storage.settings import Settings
from storage.uploads import upload_ref


class InvalidJob(ValueError):
    """The job cannot run as submitted; the message says what to fix, `code` is stable (README, "Error
    codes") and `field` names the offending job field."""

    def __init__(self, message: str, code: str = "invalid_parameter", field: str | None = None, status: int = 422):
        super().__init__(message)
        self.code, self.field, self.status = code, field, status


def resolve_under_roots(raw: str, what: str, roots: list[Path], field: str | None = None) -> Path:
    """The path with links resolved, if it lies under one of the roots; else InvalidJob."""
    if "\x00" in raw:
        raise InvalidJob(f"{what} contains a NUL byte", "invalid_path", field)
    if not os.path.isabs(raw):
        raise InvalidJob(f"{what} {raw!r} must be an absolute path under ERQ_DATA_ROOTS", "invalid_path", field)
    resolved = Path(raw).resolve()
    if not under_any(resolved, roots):
        allowed = ", ".join(str(r) for r in roots) or "(none configured)"
        raise InvalidJob(f"{what} {raw!r} is outside the allowed data roots ({allowed}); set ERQ_DATA_ROOTS",
                         "path_outside_roots", field)
    return resolved


def check_model_allowed(spec: str, settings: Settings) -> None:
    if not settings.model_allowed(spec, frozenset(MODEL_ALIASES)):
        raise InvalidJob(f"model {spec!r} is not enabled on this service (ERQ_ALLOWED_MODELS="
                         f"{settings.allowed_models!r}); GET /v1/models lists what is accepted",
                         "model_not_allowed", "model")


# What the engine's checks see in place of an upload's name (`dataset:ID`, `upload:ID`): they check the
# form of a path or a model spec, and an upload has neither. The owner's uploads are checked by
# check_uploads, under the owner's lock.
UPLOAD_STAND_INS = {"dataset": "uploaded-dataset", "model": "local-dir:uploaded-model"}


def validate_job(params: dict, settings: Settings, owner: str) -> dict:
    """Check a job's parameters for `owner` (its name: ERQ_DATA_ROOTS' `{owner}` entries); return them
    with paths resolved and derived defaults filled in. Raises InvalidJob."""
    named = {field: stand_in for field, stand_in in UPLOAD_STAND_INS.items() if upload_ref(field, params.get(field))}
    try:
        config = ErqConfig.from_dict({**params, **named}).validate()
    except ConfigError as exc:
        message = str(exc)
        raise InvalidJob(message, "unknown_model" if message.startswith("unknown model") else "invalid_parameter",
                         _field_named_in(message)) from None
    check_model_allowed(params["model"], settings)
    roots = settings.data_roots_for(owner)
    # Defaults the config derives (calib_size from the method) are filled in: the job shows what it runs.
    params = {name: config.to_dict()[name] if params[name] is None else value for name, value in params.items()}
    if "dataset" not in named:
        with _path_errors("dataset"):
            dataset = resolve_under_roots(params["dataset"], "dataset", roots, "dataset")
            for split in ("train", "val"):
                if not (dataset / split).is_dir():
                    raise InvalidJob(f"dataset {params['dataset']!r} has no {split!r} folder (expected an "
                                     "ImageFolder root with train/<class>/<image> and val/<class>/<image>)",
                                     "invalid_dataset", "dataset")
        params["dataset"] = str(dataset)
    folder = local_dir_path(params["model"])
    if folder is not None:
        with _path_errors("model"):
            resolved = resolve_under_roots(folder, "local model folder", roots, "model")
            if not (resolved / "config.json").is_file():
                raise InvalidJob(f"local model folder {folder!r} has no config.json", "invalid_model", "model")
        params["model"] = f"local-dir:{resolved}"
    if params.get("checkpoint"):
        with _path_errors("checkpoint"):
            checkpoint = resolve_under_roots(params["checkpoint"], "checkpoint", roots, "checkpoint")
            if not checkpoint.is_file() or checkpoint.suffix != ".safetensors":
                raise InvalidJob(f"checkpoint {params['checkpoint']!r} must be an existing .safetensors file",
                                 "invalid_checkpoint", "checkpoint")
        params["checkpoint"] = str(checkpoint)
    return params


@contextmanager
def _path_errors(field: str) -> Iterator[None]:
    """A path the file system refuses to look at (a name over 255 bytes, a loop of links, ...) is the
    caller's to fix: 422, never a server error. The message names the field, not the path's parts."""
    try:
        yield
    except OSError as exc:
        raise InvalidJob(f"{field}: the path cannot be used: {exc.strerror or type(exc).__name__}", "invalid_path",
                         field) from None


def check_uploads(session: Session, owner_id: int, params: dict) -> None:
    """The uploads a job names are the owner's (else 404), fit the job (a dataset without val/ needs
    `evaluate: false`; enough training images for the calibration) and are renewed for retention.
    Raises InvalidJob."""
    found = uploads.use(session, owner_id, params)
    for field, (what, listing) in (("dataset", ("dataset", "GET /v1/datasets")),
                                   ("model", ("uploaded model", "GET /v1/models/uploads"))):
        upload_id = upload_ref(field, params.get(field))
        if upload_id is not None and field not in found:
            raise InvalidJob(f"no {what} {upload_id!r} for this API key's owner ({listing} lists yours)",
                             "upload_not_found", field, status=404)
    dataset = found.get("dataset")
    if dataset is not None:
        if params.get("evaluate", True) and not dataset.details.get("val_images"):
            raise InvalidJob(f"dataset {params['dataset']} has no val/ images to evaluate on: upload it with val/, "
                             "or submit with evaluate false", "invalid_dataset", "dataset")
        needed = max(params.get("calib_size") or 0, params.get("reconstruct_images") or 0
                     if params.get("reconstruct") else 0)
        if needed > dataset.details.get("train_images", 0):
            raise InvalidJob(f"the job draws {needed} calibration images but dataset {params['dataset']} has "
                             f"{dataset.details['train_images']} in train/", "invalid_parameter", "calib_size")


def _field_named_in(message: str) -> str | None:
    """The ErqConfig field a ConfigError message starts with ('w_bits must be ...'), if any."""
    for spec in sorted(fields(), key=lambda s: -len(s.name)):
        if message.startswith(spec.name + " ") or message.startswith(spec.name + ":"):
            return spec.name
    if "model" in message.split(" ", 3)[:3]:
        return "model"
    return None
