"""`erq serve`, `erq api` and `erq admin`."""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from pathlib import Path

from storage.db import session_scope
from storage.keys import create_key, has_keys, revoke_key
from storage.migrate import upgrade
from storage.settings import Settings, get_settings, prepare_local_folders

LOCAL_KEY_NAME = "local"
WORKER_STOP_SECONDS = 10
WORKER_RESTART_SECONDS = 2


def _prepare(settings: Settings) -> None:
    prepare_local_folders(settings)
    upgrade(settings.database_url)


def _server_args(prog: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    return parser.parse_args(argv)


def _run_api(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    from service.app import create_app

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


def api_main(argv: list[str]) -> int:
    args = _server_args("erq api", argv)
    settings = get_settings()
    _prepare(settings)
    _run_api(settings, args.host, args.port)
    return 0


def ensure_local_key(settings: Settings) -> None:
    """On a fresh embedded install, create a key and leave it in var/api-key for the Quickstart."""
    key_file = settings.var_dir / "api-key"
    with session_scope(settings.database_url) as session:
        if has_keys(session):
            return
        raw = create_key(session, LOCAL_KEY_NAME)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(raw + "\n")
    key_file.chmod(0o600)
    # The key itself is never printed: server output tends to end up in logs.
    print(f"erq: created API key {LOCAL_KEY_NAME!r}; read it from {key_file}", flush=True)


def serve_main(argv: list[str]) -> int:
    args = _server_args("erq serve", argv)
    settings = get_settings()
    _prepare(settings)
    ensure_local_key(settings)
    worker = EmbeddedWorker() if settings.embedded_broker else None
    if worker is not None:
        worker.start()
    try:
        _run_api(settings, args.host, args.port)
    finally:
        if worker is not None:
            worker.stop()
    return 0


class EmbeddedWorker(threading.Thread):
    """The worker beside `erq serve`'s API: restarted if it dies, stopped with the API."""

    def __init__(self):
        super().__init__(daemon=True, name="embedded-worker")
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.process: subprocess.Popen | None = None

    def run(self) -> None:
        while True:
            with self.lock:
                if self.stopping.is_set():
                    return
                # Its own session, so that Ctrl-C reaches only `erq serve`, which then stops the worker.
                self.process = subprocess.Popen([sys.executable, "-m", "erq_cli", "worker"], start_new_session=True)
            code = self.process.wait()
            if self.stopping.wait(WORKER_RESTART_SECONDS):
                return
            print(f"erq serve: the worker exited with code {code}; starting a new one", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """Warm shutdown: the running job goes back to the queue; kill after WORKER_STOP_SECONDS."""
        with self.lock:
            self.stopping.set()
            process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def admin_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="erq admin", description="Manage API keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("create-key", help="create a key and print it (alone on the last line)").add_argument("name")
    commands.add_parser("revoke-key", help="revoke the key with this name").add_argument("name")
    args = parser.parse_args(argv)
    settings = get_settings()
    _prepare(settings)
    with session_scope(settings.database_url) as session:
        if args.command == "create-key":
            try:
                raw = create_key(session, args.name)
            except ValueError as exc:
                print(f"erq admin: error: {exc}", file=sys.stderr)
                return 2
            print(f"created API key {args.name!r}; store it now, it is not shown again:")
            print(raw)
            return 0
        if not revoke_key(session, args.name):
            print(f"erq admin: error: no active key named {args.name!r}", file=sys.stderr)
            return 2
        print(f"revoked API key {args.name!r}")
        return 0
