"""bench/load.py's upload mode: many concurrent uploads of a large dataset to a real `erq api`.

    .venv/bin/python bench/load.py --mode embedded --uploads 50 --upload-mb 50 --workers 0

Each client uploads a different ImageFolder tar of about --upload-mb MB (the same images of random
noise, which do not compress, plus one image of its own: every upload is checked in full and stored
as its own dataset), all at once, streamed from memory. Reported: answers by status, errors, upload
latency (p50, p99), the bytes the API received per second, and the API process's memory: its
resident set before the uploads and its peak (VmHWM) after them, from /proc.
"""
from __future__ import annotations

import asyncio
import io
import os
import statistics
import tarfile
import time
from collections import Counter

import httpx

IMAGE_SIDE = 128  # RGB noise: a PNG of about 49 KB
CLASSES = 10
CHUNK = 1 << 20


def _png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", (IMAGE_SIDE, IMAGE_SIDE), os.urandom(IMAGE_SIDE * IMAGE_SIDE * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


def dataset_body(megabytes: int) -> tuple[bytes, int]:
    """A tar's members (train/ and val/ of CLASSES classes, one image in five in val/) of about
    `megabytes` MB, without the tar's end; and how many images."""
    members, size, index = [], 0, 0
    while size < megabytes * 1e6 or index < 5 * CLASSES:
        split = "val" if index % 5 == 4 else "train"
        member = _member(f"{split}/class{(index // 5) % CLASSES}/{index:06d}.png", _png(index))
        members.append(member)
        size += len(member)
        index += 1
    return b"".join(members), index


def variant(body: bytes, number: int) -> tuple[list[memoryview], int]:
    """The body, one image of its own, the end of the tar: chunks to stream, and their size."""
    tail = _member(f"train/class0/upload{number:04d}.png", _png(10**6 + number)) + b"\0" * 1024
    view = memoryview(body)
    chunks = [view[start:start + CHUNK] for start in range(0, len(body), CHUNK)] + [memoryview(tail)]
    return chunks, len(body) + len(tail)


def process_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (its peak) of a process, in bytes."""
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0]) * 1024
    return found


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def scenario(url: str, key: str, api_pid: int, uploads: int, megabytes: int) -> dict:
    body, images = dataset_body(megabytes)
    bodies = [variant(body, number) for number in range(uploads)]
    statuses, errors, latencies = Counter(), Counter(), []
    memory_before, cpu_before = process_memory(api_pid), process_cpu_seconds(api_pid)

    async def send(client: httpx.AsyncClient, chunks: list[memoryview], size: int) -> None:
        async def stream():
            for chunk in chunks:
                yield bytes(chunk)

        start = time.perf_counter()
        try:
            answer = await client.post("/v1/datasets", content=stream(),
                                       headers={"Content-Type": "application/x-tar", "Content-Length": str(size)})
        except httpx.TransportError as exc:
            errors[f"transport: {type(exc).__name__}"] += 1
            return
        latencies.append(time.perf_counter() - start)
        statuses[answer.status_code] += 1
        if answer.status_code != 201:
            errors[f"{answer.status_code}: {answer.text[:100]}"] += 1

    limits = httpx.Limits(max_connections=uploads + 5)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=httpx.Timeout(60, read=1800, write=600)) as client:
        start = time.monotonic()
        await asyncio.gather(*(send(client, chunks, size) for chunks, size in bodies))
        elapsed = time.monotonic() - start
        listed = (await client.get("/v1/datasets", params={"limit": 100})).json()["datasets"]
    sent = sum(size for _, size in bodies)
    memory_after = process_memory(api_pid)
    return {
        "uploads": uploads, "upload_bytes": bodies[0][1], "images_per_upload": images + 1,
        "answers": {str(code): count for code, count in statuses.items()}, "errors": sum(errors.values()),
        "error_reasons": dict(errors), "datasets_recorded": len(listed),
        "upload_p50_s": round(statistics.median(latencies), 2) if latencies else None,
        "upload_p99_s": round(sorted(latencies)[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2)
        if latencies else None,
        "elapsed_s": round(elapsed, 1), "received_mb_per_s": round(sent / 1e6 / elapsed, 1),
        "api_rss_before_mb": round(memory_before["VmRSS"] / 1e6, 1),
        "api_peak_rss_mb": round(memory_after["VmHWM"] / 1e6, 1),
        "api_cpu_s": round(process_cpu_seconds(api_pid) - cpu_before, 1),
    }
