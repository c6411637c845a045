"""Supported models: aliases, timm names and the preprocessing each alias needs.

Light on purpose (no torch, no timm) so that the API can validate a model spec at submit time.
`timm_models.txt` is the list of timm architectures built from the blocks erq_core quantizes
(the vision_transformer, deit and swin_transformer families) less those whose attention erq cannot
quantize (SigLIP's attention pooling, the _xp, wee and dlittle variants: convert_model refuses them);
`tests/test_registry.py` checks it against the installed timm.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Optional

from erq_core.errors import ConfigError

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
_HF_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?$")


@dataclass(frozen=True)
class ModelEntry:
    alias: str
    timm_name: str
    # Overrides of the timm pretrained_cfg preprocessing that the ERQ paper's evaluation uses.
    preprocessing: dict = field(default_factory=dict)


_DEIT = {"crop_pct": 0.875}
MODEL_ALIASES: dict[str, ModelEntry] = {
    entry.alias: entry
    for entry in (
        ModelEntry("vit_small", "vit_small_patch16_224"),
        ModelEntry("vit_base", "vit_base_patch16_224"),
        ModelEntry("deit_tiny", "deit_tiny_patch16_224", _DEIT),
        ModelEntry("deit_small", "deit_small_patch16_224", _DEIT),
        ModelEntry("deit_base", "deit_base_patch16_224", _DEIT),
        ModelEntry("swin_tiny", "swin_tiny_patch4_window7_224"),
        ModelEntry("swin_small", "swin_small_patch4_window7_224"),
        ModelEntry("swin_base", "swin_base_patch4_window7_224"),
    )
}


@lru_cache(maxsize=1)
def supported_timm_names() -> frozenset[str]:
    text = resources.files("erq_core").joinpath("timm_models.txt").read_text()
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


def local_dir_path(spec: str) -> Optional[str]:
    """The folder of a `local-dir:/path` spec, else None."""
    return spec[len(LOCAL_DIR_PREFIX):] if spec.startswith(LOCAL_DIR_PREFIX) else None


def resolve_alias(spec: str) -> tuple[str, dict]:
    """Map an alias to (timm name, preprocessing overrides); other specs pass through."""
    entry = MODEL_ALIASES.get(spec)
    if entry is not None:
        return entry.timm_name, dict(entry.preprocessing)
    return spec, {}


def validate_model_spec(spec: object) -> None:
    """Check the form of a model spec; raise ConfigError saying what is accepted."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError("model must be a non-empty string")
    if spec in MODEL_ALIASES:
        return
    if spec.startswith(HF_HUB_PREFIX):
        if not _HF_HUB_ID.match(spec[len(HF_HUB_PREFIX):]):
            raise ConfigError(f"model {spec!r}: expected hf-hub:ORG/NAME")
        return
    if spec.startswith(LOCAL_DIR_PREFIX):
        if not spec[len(LOCAL_DIR_PREFIX):].strip():
            raise ConfigError(f"model {spec!r}: expected local-dir:/path/to/folder")
        return
    name = spec.split(".", 1)[0]  # timm names may carry a pretrained tag: vit_small_patch16_224.augreg_in21k
    if name not in supported_timm_names():
        raise ConfigError(
            f"unknown model {spec!r}: use an alias ({', '.join(MODEL_ALIASES)}), a timm ViT/DeiT/Swin "
            "name, hf-hub:ORG/NAME or local-dir:/path"
        )
