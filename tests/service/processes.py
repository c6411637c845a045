"""Real `erq` processes for end-to-end tests: start, wait until they answer, stop."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import httpx

ERQ = str(Path(sys.executable).parent / "erq")


def free_port() -> int:
    """A port free now, for third-party servers that cannot bind port 0 and report it (redis-server's
    --port 0 turns TCP off; SeaweedFS needs its ports up front). `erq` processes use api_process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ANNOUNCED_PORT = re.compile(rb"Uvicorn running on http://[^\s]+:(\d+)")


@contextmanager
def api_process(args: list[str], env: dict, cwd: Path, log: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    """`erq api` or `erq serve` (args[0]) bound to port 0, answering /healthz: the process and the
    port it reports in its log. No port is picked beforehand, so parallel runs cannot collide."""
    offset = log.stat().st_size if log.exists() else 0
    with erq_process([*args, "--port", "0"], env, cwd, log) as process:
        port = announced_port(log, offset, process)
        wait_for_http(f"http://127.0.0.1:{port}/healthz", process, log)
        yield process, port


def announced_port(log: Path, offset: int, process: subprocess.Popen, seconds: float = 60) -> int:
    """The port uvicorn reports once it listens, read from `log` past `offset` (logs are appended to)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = ANNOUNCED_PORT.search(log.read_bytes()[offset:]) if log.exists() else None
        if found:
            return int(found.group(1))
        if process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no listening port reported within {seconds} s:\n{log.read_text()[-3000:]}")


@contextmanager
def erq_process(args: list[str], env: dict, cwd: Path, log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "ab") as out:
        process = subprocess.Popen([ERQ, *args], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wait_for_http(url: str, process: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {seconds} s:\n{log.read_text()[-3000:]}")


def api_client(port: int, key: str) -> httpx.Client:
    """An HTTP client for the API on 127.0.0.1:port, authenticated with `key`."""
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=30)


@contextmanager
def serving(tmp_path: Path, env: dict) -> Iterator[tuple[subprocess.Popen, httpx.Client]]:
    """`erq serve` (API and embedded worker) on a port of its own, answering, and a client with the key
    it created for the Quickstart; its output goes to tmp_path/serve.log."""
    log = tmp_path / "serve.log"
    with api_process(["serve"], env, tmp_path, log) as (serve, port):
        key = (Path(env["ERQ_HOME"]) / "api-key").read_text().strip()
        with api_client(port, key) as client:
            yield serve, client


def wait_for_job(client: httpx.Client, job_id: str, statuses: tuple[str, ...], seconds: float = 180) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not reach {statuses} within {seconds} s: {job}")


def wait_for_text(path: Path, text: str, seconds: float = 120, process: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} within {seconds} s:\n"
                         f"{path.read_text(errors='replace')[-3000:] if path.is_file() else '(no file)'}")
