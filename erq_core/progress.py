"""Progress reporting: the engine calls progress(stage, done, total); this turns it into tqdm bars.

The engine's callers stop a run from their progress callback (the worker raises there on cancel,
shutdown or time limit), so every long loop of the engine calls it at least every few seconds.
"""
from __future__ import annotations

import sys
from typing import Optional

# erq+ walks the blocks once (LAYERS_STAGE, `done` counting layers); with --reconstruct, each block's
# reconstruction steps are RECONSTRUCT_STAGE, reported between its layers and the next block's.
LAYERS_STAGE, RECONSTRUCT_STAGE = "quantize_layers", "reconstruct"


class TqdmProgress:
    """One tqdm bar per stage, on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: Optional[bool] = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._stage: Optional[str] = None
        self._bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=total or None, desc=stage, unit="step", leave=True, dynamic_ncols=True)
        if total and self._bar.total != total:
            self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
