"""Building the full-precision timm model a job asks for, with clear errors when it can't be had.

Specs: an alias (deit_small, ...), any timm name, `hf-hub:ORG/NAME` or `local-dir:/path` (timm's
folder format: config.json + model.safetensors). `checkpoint` loads a local safetensors state dict
instead of downloading; `random_init` builds the architecture without weights.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import torch
from torch import nn

from erq_core.config import ErqConfig
from erq_core.errors import CheckpointError, ModelLoadError
from erq_core.paths import inside_roots
from erq_core.registry import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, local_dir_path, resolve_alias

log = logging.getLogger("erq")
_SUPPLY_WEIGHTS = ("supply weights with --checkpoint FILE.safetensors, use local-dir:/path/to/timm_folder, "
                   "or --random-init for a smoke test")


@dataclass
class LoadedModel:
    model: nn.Module
    # How to rebuild the architecture (saved in config.json): spec, architecture, model_args.
    source: dict[str, Any]
    # pretrained_cfg after the registry's preprocessing overrides (input size, mean, std, crop_pct, ...).
    pretrained_cfg: dict[str, Any]


def load_model(config: ErqConfig, device: torch.device | str = "cpu") -> LoadedModel:
    import timm

    spec, overrides = resolve_alias(config.model)
    folder = local_dir_path(spec)
    if folder is not None:
        model, architecture, model_args = _from_local_dir(Path(folder), config.random_init)
    elif spec.startswith(HF_HUB_PREFIX):
        model, architecture, model_args = _from_hub(spec, config.random_init)
    else:
        architecture, model_args = spec.split(".", 1)[0], {}
        if not timm.is_model(architecture):
            raise ModelLoadError(f"unknown model {config.model!r}: not a timm architecture")
        pretrained = not (config.random_init or config.checkpoint)
        model = _create(spec, pretrained=pretrained)
    if config.checkpoint:
        load_checkpoint(model, Path(config.checkpoint))
    pretrained_cfg = {**dict(model.pretrained_cfg), **overrides}
    model.pretrained_cfg = pretrained_cfg
    source = {"spec": config.model, "architecture": architecture, "model_args": model_args,
              "num_classes": model.num_classes}
    return LoadedModel(model.eval().to(device), source, _json_safe(pretrained_cfg))


def build_architecture(source: dict[str, Any]) -> nn.Module:
    """The bare architecture a saved source describes, without downloading anything."""
    import timm

    args = dict(source.get("model_args") or {})
    args.setdefault("num_classes", source.get("num_classes"))
    return timm.create_model(source["architecture"], pretrained=False, **args).eval()


def _create(spec: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm

    if not pretrained:
        return timm.create_model(spec, pretrained=False, **kwargs)
    try:
        with _offline_unless_hub_reachable():
            return timm.create_model(spec, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"cannot get pretrained weights for {spec!r} "
                             f"(no network and not in the local cache?): {_SUPPLY_WEIGHTS}") from exc


def _from_local_dir(folder: Path, random_init: bool) -> tuple[nn.Module, str, dict]:
    from timm.models._hub import load_model_config_from_path

    inside_roots(folder, "local model folder", ModelLoadError)  # each before looking: nothing said of the outside
    inside_roots(folder / "config.json", "model config", ModelLoadError)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"local model folder {str(folder)!r} has no config.json "
                             "(expected timm's folder format: config.json + model.safetensors)")
    try:
        _, architecture, model_args = load_model_config_from_path(folder)
    except (KeyError, ValueError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{folder / 'config.json'}: not a timm model config ({exc})") from exc
    weights = folder / "model.safetensors"
    inside_roots(weights, "model weights", CheckpointError)
    if not random_init and not weights.is_file():
        raise ModelLoadError(f"local model folder {str(folder)!r} has no model.safetensors: {_SUPPLY_WEIGHTS}")
    model = _create(f"{LOCAL_DIR_PREFIX}{folder}", pretrained=False)
    if not random_init:
        load_checkpoint(model, weights)
    return model, architecture, dict(model_args or {})


def _from_hub(spec: str, random_init: bool) -> tuple[nn.Module, str, dict]:
    from timm.models._hub import load_model_config_from_hf

    try:
        with _offline_unless_hub_reachable():
            _, architecture, model_args = load_model_config_from_hf(spec[len(HF_HUB_PREFIX):])
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"cannot get {spec!r} from the Hugging Face Hub "
                             f"(no network and not in the local cache?): {_SUPPLY_WEIGHTS}") from exc
    model = _create(spec, pretrained=not random_init)
    return model, architecture, dict(model_args or {})


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a safetensors state dict. Pickled checkpoints are refused, never unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    inside_roots(path, "checkpoint", CheckpointError)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a .safetensors file; pickled checkpoints are refused. Convert it: "
            "python -c \"import torch,safetensors.torch as s; s.save_file(torch.load('IN', weights_only=True), 'OUT.safetensors')\"")
    try:
        state = load_file(str(inside_roots(path, "checkpoint", CheckpointError)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a valid safetensors file ({exc})") from exc
    if "state_dict" in state or "model" in state:
        raise CheckpointError(f"checkpoint {str(path)!r} must hold the model's state dict itself")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit the architecture: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}")


@contextmanager
def _offline_unless_hub_reachable() -> Iterator[None]:
    """Without a route to the Hub, use only the local cache instead of retrying for a minute."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    if not previous and not _hub_reachable():
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _json_safe(cfg: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(cfg, default=lambda value: list(value) if isinstance(value, tuple) else str(value)))
