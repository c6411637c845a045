"""A download as the store answers it: the one way the API reads an artifact (GET or HEAD, whole or
a byte range), whichever store holds it. The store says what to send (the bytes, or a short-lived
URL where the client fetches them); the API turns that into HTTP and adds what the database knows
(the ETag is the artifact's recorded sha256)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Optional

# One range of bytes: `first-last`, `first-` or `-suffix` (RFC 9110, section 14.1.2).
RANGE = re.compile(r"(\d*)-(\d*)", re.ASCII)


class ArtifactGone(Exception):
    """A recorded artifact whose file the store no longer holds; `where` names what is missing."""

    def __init__(self, where: str):
        super().__init__(f"{where} is missing")
        self.where = where


class RangeNotSatisfiable(Exception):
    """The range asked for starts at or past the end of the file (`size` bytes)."""

    def __init__(self, size: int):
        super().__init__(f"the range starts past the end of the file ({size} bytes)")
        self.size = size


@dataclass(frozen=True)
class RangeRequest:
    """A Range header's one range, before the file's size is known: `bytes=first-last`,
    `bytes=first-` (last None) or `bytes=-suffix` (first None, last the suffix's length)."""

    first: Optional[int]
    last: Optional[int]

    @classmethod
    def parse(cls, header: Optional[str]) -> Optional["RangeRequest"]:
        """The range a Range header asks for, None for the whole file. What is not one valid byte
        range (malformed, another unit, several ranges) is ignored, as RFC 9110 allows."""
        unit, _, spec = (header or "").partition("=")
        found = RANGE.fullmatch(spec.strip()) if unit.strip().lower() == "bytes" else None
        if found is None or found.group(0) == "-":
            return None
        first, last = (int(part) if part else None for part in found.groups())
        if first is not None and last is not None and last < first:
            return None
        return cls(first, last)

    def header(self) -> str:
        """The same range as a Range header's value."""
        return f"bytes={'' if self.first is None else self.first}-{'' if self.last is None else self.last}"

    def within(self, size: int) -> "ByteRange":
        """The bytes of a file of `size` bytes this range names; raises RangeNotSatisfiable."""
        if self.first is None:  # the last `last` bytes
            if not self.last or not size:
                raise RangeNotSatisfiable(size)
            return ByteRange(max(0, size - self.last), size - 1)
        if self.first >= size:
            raise RangeNotSatisfiable(size)
        return ByteRange(self.first, size - 1 if self.last is None else min(self.last, size - 1))


@dataclass(frozen=True)
class ByteRange:
    """Bytes `start` to `end` of a file, both included."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


@dataclass(frozen=True)
class DownloadRequest:
    """What the client asked for: the file's headers alone (HEAD), or its bytes (all of them, or the
    range of a Range header); `redirect`: a presigned URL is an acceptable answer (ERQ_S3_DOWNLOAD)."""

    headers_only: bool = False
    range: Optional[RangeRequest] = None
    redirect: bool = False


@dataclass
class Download:
    """The store's answer: the file's `size` and, for a GET, either `url` (fetch it there, Range
    included) or `chunks` (the bytes to send: all of them, or `byte_range`'s)."""

    size: int
    byte_range: Optional[ByteRange] = None
    url: Optional[str] = None
    chunks: Optional[Iterator[bytes]] = None

    @property
    def length(self) -> int:
        """How many bytes `chunks` yields."""
        return self.byte_range.length if self.byte_range else self.size
