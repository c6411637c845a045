"""Which files the engine may read: with roots set (the worker sets them for each job), every dataset
folder, image, model folder and checkpoint must resolve, links followed, inside one of them; checked
where the file is opened, so a link inside a dataset cannot lead a job out of its roots.

Without roots (the command line, `erq quantize` on one's own files) nothing is restricted. An error
names the path as the job gave it or found it inside its roots, never where a link points.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

from erq_core.errors import ErqError

_roots: Optional[tuple[Path, ...]] = None  # None: unrestricted


class PathOutsideRoots(ErqError):
    """A file a job reads resolves outside the data roots it may read."""


@contextmanager
def restricted_to(roots: Sequence[str | os.PathLike]) -> Iterator[None]:
    """Within the block, `inside_roots` admits only paths resolving under `roots` (none: nothing)."""
    global _roots
    previous = _roots
    _roots = tuple(Path(root).resolve() for root in roots)
    try:
        yield
    finally:
        _roots = previous


def under_any(resolved: Path, roots: Sequence[Path]) -> bool:
    """Whether the resolved path is one of `roots` (resolved too) or lies below one."""
    return any(resolved == root or root in resolved.parents for root in roots)


def inside_roots(path: str | os.PathLike, what: str, error: type[ErqError] = PathOutsideRoots) -> Path:
    """`path` resolved (links followed) if reading it is allowed; else `error`, naming `path` only."""
    resolved = Path(path).resolve()
    if _roots is not None and not under_any(resolved, _roots):
        raise error(f"{what} {str(path)!r} leads outside the data roots this job may read "
                    "(a link to elsewhere?); only files under ERQ_DATA_ROOTS can be used")
    return resolved
