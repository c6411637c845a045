"""The one description of a quantization run, shared by the CLI, the REST schema and checkpoints.

This module is deliberately light (no torch, no timm): the API process validates job
parameters with it without loading the engine.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from erq_core.errors import ConfigError
from erq_core.registry import validate_model_spec

METHODS = ("erq", "repq", "rtn")
MIN_BITS, MAX_BITS = 2, 8
MAX_CALIB_SIZE = 100_000
MAX_BATCH_SIZE = 4096


@dataclass(frozen=True)
class ErqConfig:
    """What to quantize and how. Saved verbatim beside every quantized model."""

    model: str
    dataset: Optional[str] = None
    w_bits: int = 4
    a_bits: int = 4
    coe: float = 10000.0
    calib_size: int = 32
    method: str = "erq"
    aqer: bool = True
    wqer: bool = True
    seed: int = 0
    checkpoint: Optional[str] = None
    random_init: bool = False
    evaluate: bool = True
    val_limit: Optional[int] = None
    batch_size: int = 32

    def validate(self) -> "ErqConfig":
        """Raise ConfigError with a message that says what to fix; return self when fine."""
        validate_model_spec(self.model)
        for name in ("w_bits", "a_bits"):
            bits = getattr(self, name)
            if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
                raise ConfigError(f"{name} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.coe, (int, float)) or isinstance(self.coe, bool) or not self.coe > 0:
            raise ConfigError(f"coe (the ridge lambda) must be a positive number, got {self.coe!r}")
        if not isinstance(self.calib_size, int) or not 1 <= self.calib_size <= MAX_CALIB_SIZE:
            raise ConfigError(f"calib_size must be an integer from 1 to {MAX_CALIB_SIZE}, got {self.calib_size!r}")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ConfigError(f"batch_size must be an integer from 1 to {MAX_BATCH_SIZE}, got {self.batch_size!r}")
        if self.val_limit is not None and (not isinstance(self.val_limit, int) or self.val_limit < 1):
            raise ConfigError(f"val_limit must be a positive integer or null, got {self.val_limit!r}")
        if not self.dataset:
            raise ConfigError("dataset is required: an ImageFolder root with train/ and val/ folders")
        return self

    @property
    def uses_aqer(self) -> bool:
        return self.method == "erq" and self.aqer

    @property
    def uses_wqer(self) -> bool:
        return self.method == "erq" and self.wqer

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ErqConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown configuration fields: {', '.join(unknown)}")
        return cls(**data)
