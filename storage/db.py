"""Engine and sessions for the configured database (SQLite by default, PostgreSQL in production)."""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from storage.private_files import private_sqlite_file


_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker] = {}
_engines_lock = threading.Lock()


def engine_for(url: str) -> Engine:
    """One engine (connection pool) per URL and process."""
    with _engines_lock:
        if url not in _engines:
            _engines[url] = _create_engine(url)
        return _engines[url]


def _forget_pools_after_fork() -> None:
    """A forked child (prefork worker pool) must not reuse its parent's open connections."""
    global _engines_lock
    _engines_lock = threading.Lock()  # another thread of the parent may have held it at the fork
    for engine in _engines.values():
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_pools_after_fork)


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        try:
            private_sqlite_file(url)  # before SQLite makes it with the umask's mode (0644)
        except OSError:
            pass  # not ours to change (erq's commands check it at start, naming the setting)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record):  # concurrent API + worker processes on one file
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5} if "postgres" in url else {})


def session_factory(url: str) -> sessionmaker[Session]:
    """The session factory of the URL's engine (one per URL and process, like the engine)."""
    engine = engine_for(url)
    with _engines_lock:
        if url not in _factories:
            _factories[url] = sessionmaker(engine, expire_on_commit=False)
        return _factories[url]


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error (workers, the sweeper, commands;
    the API's routes get theirs from service.deps)."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def ping(url: str) -> None:
    with engine_for(url).connect() as connection:
        connection.execute(text("SELECT 1"))
