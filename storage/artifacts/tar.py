"""A job's result folder as one tar, streamed from the store as it is read (GET /v1/jobs/ID/artifacts.tar):
extracted, it is what erq_core.load_quantized reads."""
from __future__ import annotations

import tarfile
from typing import Iterator, Optional

from storage.artifacts.interface import ArtifactStore

TAR_BLOCK = 512


class ResultTar:
    """The tar of `sizes` (name -> recorded size, in RESULT_FOLDER's order) of one run; its length is
    known before a byte is read."""

    def __init__(self, store: ArtifactStore, job_id: str, run: Optional[str], sizes: dict[str, int], mtime: int):
        self.store, self.job_id, self.run = store, job_id, run
        self.members = [(name, _tar_header(name, size, mtime)) for name, size in sizes.items()]
        self.length = sum(len(header) + _padded(size) for (_, header), size in zip(self.members, sizes.values())) \
            + 2 * TAR_BLOCK

    def stream(self) -> Iterator[bytes]:
        for name, header in self.members:
            yield header
            sent = 0
            for block in self.store.iter_bytes(self.job_id, self.run, name):
                sent += len(block)
                yield block
            yield b"\0" * (_padded(sent) - sent)
        yield b"\0" * (2 * TAR_BLOCK)


def _tar_header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, mtime
    return info.tobuf(format=tarfile.GNU_FORMAT)  # sizes past 8 GiB fit its header


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK
