"""worker.keeper: one way to keep a worker process running, with real child processes."""
from __future__ import annotations

import sys
import threading
import time

import pytest

from worker import keeper as keeper_module
from worker.keeper import EXIT_CONFIGURATION, Keeper

pytestmark = pytest.mark.integration  # real child processes


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def wait_until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_child_that_exits_is_started_again(monkeypatch):
    monkeypatch.setattr(keeper_module, "RESTART_SECONDS", 0.1)
    keeper = Keeper("crasher", python("import sys; sys.exit(1)"), stop_seconds=5)
    keeper.start()
    wait_until(lambda: keeper.starts >= 3)
    keeper.stop()
    assert not keeper.is_alive() and not keeper.misconfigured


def test_a_misconfigured_child_is_not_started_again_and_is_reported():
    reported = threading.Event()
    keeper = Keeper("misconfigured", python(f"import sys; sys.exit({EXIT_CONFIGURATION})"), stop_seconds=5,
                    on_misconfigured=lambda k: reported.set())
    keeper.start()
    assert reported.wait(60)
    keeper.join(10)
    assert not keeper.is_alive() and keeper.misconfigured and keeper.starts == 1


def test_stop_asks_with_sigterm_and_kills_a_child_that_ignores_it(tmp_path):
    ready = tmp_path / "ready"
    polite = Keeper("polite", python("import time\nwhile True: time.sleep(0.1)"), stop_seconds=30)
    stubborn = Keeper("stubborn", python("import pathlib, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                         f"pathlib.Path({str(ready)!r}).touch()\nwhile True: time.sleep(0.1)"),
                      stop_seconds=1)
    for keeper in (polite, stubborn):
        keeper.start()
    wait_until(lambda: polite.process is not None and ready.exists())  # the handler is in place
    keeper_module.stop_all([polite, stubborn])
    assert polite.process.returncode == -15  # stopped by SIGTERM
    assert stubborn.process.returncode == -9  # ignored it, killed after its stop_seconds
    assert polite.starts == stubborn.starts == 1
