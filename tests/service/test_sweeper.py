"""The sweeper thread: each duty fails alone, and the health signal goes on."""
from __future__ import annotations

import threading
import time

from worker.sweeper import Duty, Sweeper


def test_a_failing_duty_is_counted_and_neither_stops_the_others_nor_the_health_file(tmp_path):
    health = tmp_path / "worker.alive"
    ran = threading.Event()

    def broken() -> None:
        raise AttributeError("'NoneType' object has no attribute 'get'")

    failing, working = Duty("broken", 0, broken), Duty("working", 0, ran.set)
    sweeper = Sweeper([failing, working], health)
    sweeper.start()
    try:
        deadline = time.monotonic() + 30
        while not (health.exists() and ran.is_set() and failing.failures >= 2):
            assert time.monotonic() < deadline, (health.exists(), ran.is_set(), failing.failures)
            time.sleep(0.05)
    finally:
        sweeper.stop()
        sweeper.join(10)
    assert not failing.ok and working.ok and working.failures == 0
