"""ERQ_HOME and what it holds that others must not read: the folder is 0700, the embedded database,
the embedded broker, the first API key and the server key 0600: created so whatever the umask, and
tightened at start when an older install left them readable. Webhook secrets are sealed at rest."""
from __future__ import annotations

import os
import sqlite3
import stat
import threading
from contextlib import contextmanager

import pytest

from service.cli import ensure_local_key
from storage.migrate import upgrade
from storage.private_files import private_sqlite_file
from storage.settings import Settings
from tests.service.conftest import run_erq, service_env

pytestmark = pytest.mark.integration  # the real erq commands


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@contextmanager
def umask(value: int):
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


def test_a_new_home_and_its_files_are_private_whatever_the_umask(tmp_path):
    env = service_env(tmp_path)
    home = tmp_path / "var"
    with umask(0):  # what a file made without an explicit mode would then get: 0666, a folder 0777
        made = run_erq(["admin", "create-key", "alice"], env, tmp_path)
        assert made.returncode == 0, made.stderr
        secret = run_erq(["admin", "webhook-secret", "alice"], env, tmp_path)
        assert secret.returncode == 0, secret.stderr
        fresh = Settings(home=tmp_path / "fresh")
        fresh.home.mkdir(mode=0o700)
        upgrade(fresh.database_url)
        ensure_local_key(fresh)  # what erq serve does on a database without keys
    assert mode(home) == 0o700
    for path in (home / "erq.sqlite", home / "broker.sqlite", home / "secret-key", fresh.home / "erq.sqlite",
                 fresh.home / "api-key"):
        assert mode(path) == 0o600, path
    for companion in home.glob("*.sqlite-*"):
        assert mode(companion) == 0o600, companion
    clear = secret.stdout.strip().splitlines()[-1]
    with sqlite3.connect(home / "erq.sqlite") as database:
        [(stored,)] = database.execute("SELECT webhook_secret FROM owners WHERE name = 'alice'").fetchall()
    assert stored.startswith("sealed:") and clear not in stored  # a copy of the database does not give it away


def test_an_older_installs_readable_files_are_tightened_at_start(tmp_path):
    env = service_env(tmp_path)
    home = tmp_path / "var"
    with umask(0o022):
        assert run_erq(["migrate"], env, tmp_path).returncode == 0
    (home / "api-key").write_text("erq_old\n")
    (home / "secret-key").write_text("x\n")
    loose = [home / "erq.sqlite", home / "broker.sqlite", home / "api-key", home / "secret-key"]
    for path in loose:
        os.chmod(path, 0o644)
    os.chmod(home, 0o755)  # as an erq before this one left them
    started = run_erq(["migrate"], env, tmp_path)
    assert started.returncode == 0, started.stderr
    assert mode(home) == 0o700
    assert {path.name: mode(path) for path in loose} == {path.name: 0o600 for path in loose}


def test_tightening_the_database_while_another_process_writes_to_it(tmp_path):
    """SQLite creates and removes the `-journal` file around every transaction of a writer in the
    API or the worker: the other process's start must not fail on one that vanishes as it looks."""
    database = tmp_path / "erq.sqlite"
    url = f"sqlite:///{database}"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE t (x INTEGER)")
    stop = threading.Event()

    def write() -> None:
        with sqlite3.connect(database, isolation_level=None) as connection:
            connection.execute("PRAGMA journal_mode=DELETE")
            while not stop.is_set():
                connection.execute("INSERT INTO t VALUES (1)")

    writer = threading.Thread(target=write)
    writer.start()
    try:
        while not (tmp_path / "erq.sqlite-journal").exists():
            pass
        for _ in range(5000):
            private_sqlite_file(url)
    finally:
        stop.set()
        writer.join()
    assert mode(database) == 0o600
    assert sqlite3.connect(database).execute("SELECT COUNT(*) FROM t").fetchone()[0] > 0
