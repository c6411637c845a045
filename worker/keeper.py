"""Keeping worker processes running: `erq serve`'s embedded worker and `erq worker --concurrency N`'s
slots are each one Keeper.

A keeper starts its command, and starts it again RESTART_SECONDS after it exits, until it is stopped:
then the child gets SIGTERM (a warm shutdown: its job goes back to the queue) and, if still running
after `stop_seconds`, SIGKILL. A child that exits with EXIT_CONFIGURATION cannot start as configured
(a missing GPU, an unusable artifact store): starting it again would fail the same way, so the keeper
stops and calls `on_misconfigured`. Each child runs in its own session (a Ctrl-C reaches only the
parent, which stops each child once) and gets SIGTERM if the parent dies, even by SIGKILL (Linux).

Light on purpose (no torch, no Celery): `erq serve` imports it.
"""
from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import threading
import time
from typing import Callable, Optional

EXIT_CONFIGURATION = 2  # what a worker exits with when it cannot run as configured
RESTART_SECONDS = 2
log = logging.getLogger("erq")


def die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM (a warm shutdown) if the parent dies."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: a parent killed with SIGKILL leaves its children running


class Keeper(threading.Thread):
    def __init__(self, name: str, command: list[str], env: Optional[dict[str, str]] = None, stop_seconds: float = 90,
                 on_misconfigured: Callable[["Keeper"], None] = lambda keeper: None):
        super().__init__(daemon=True, name=name)
        self.command, self.env, self.stop_seconds = command, env, stop_seconds
        self.on_misconfigured = on_misconfigured
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.process: Optional[subprocess.Popen] = None
        self.starts = 0
        self.misconfigured = False

    def run(self) -> None:
        while True:
            with self.lock:
                if self.stopping.is_set():
                    return
                self.process = subprocess.Popen(self.command, env=self.env, start_new_session=True,
                                                preexec_fn=die_with_parent)
                self.starts += 1
            code = self.process.wait()
            if self.stopping.is_set():
                return
            if code == EXIT_CONFIGURATION:
                log.error("%s cannot start as configured (exit code %d); not starting it again", self.name, code)
                self.misconfigured = True
                self.on_misconfigured(self)
                return
            log.warning("%s exited with code %s; starting it again in %g s", self.name, code, RESTART_SECONDS)
            if self.stopping.wait(RESTART_SECONDS):
                return

    def request_stop(self) -> None:
        """No more starts; a running child gets SIGTERM (its warm shutdown begins)."""
        with self.lock:
            self.stopping.set()
            process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)

    def wait_stopped(self, deadline: float) -> None:
        """Wait for the child until `deadline` (time.monotonic()), then kill it."""
        process = self.process
        if process is not None:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %g s; killing it", self.name, self.stop_seconds)
                process.kill()
                process.wait()
        if self.is_alive():
            self.join()

    def stop(self) -> None:
        self.request_stop()
        self.wait_stopped(time.monotonic() + self.stop_seconds)


def stop_all(keepers: list[Keeper]) -> None:
    """Warm shutdown of every keeper's child at once, each killed after its own stop_seconds."""
    for keeper in keepers:
        keeper.request_stop()
    started = time.monotonic()
    for keeper in keepers:
        keeper.wait_stopped(started + keeper.stop_seconds)
