"""Apply Alembic migrations programmatically (erq serve, api, worker, admin, migrate; tests).

Every process applies them at start-up, so they are serialized: on PostgreSQL with an advisory
lock held on the connection that migrates, on SQLite with a lock file beside the database. The
first process migrates; the others wait, then find nothing left to do.
"""
from __future__ import annotations

import fcntl
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, create_engine, pool, text

MIGRATIONS = Path(str(files("erq_migrations")))  # the top-level migrations/ folder, installed as erq_migrations
# Any fixed 64-bit number; only erq's migrations take this PostgreSQL advisory lock.
ADVISORY_LOCK_ID = 0x65_72_71_6D_69_67  # "erqmig"


def alembic_config(url: str, connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


@contextmanager
def _migration_lock(url: str) -> Iterator[Connection]:
    """A connection to migrate with, holding the lock that serializes migrations."""
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        if engine.dialect.name == "sqlite":
            with sqlite_file_lock(url), engine.connect() as connection:
                yield connection
        else:
            with engine.connect() as connection:
                connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": ADVISORY_LOCK_ID})
                connection.commit()
                try:
                    yield connection
                finally:
                    connection.rollback()
                    connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": ADVISORY_LOCK_ID})
                    connection.commit()
    finally:
        engine.dispose()


@contextmanager
def sqlite_file_lock(url: str) -> Iterator[None]:
    """An exclusive lock on a file beside the SQLite database of `url`, across processes."""
    database = url.split("sqlite:///", 1)[-1]
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def upgrade(url: str, revision: str = "head") -> None:
    with _migration_lock(url) as connection:
        command.upgrade(alembic_config(url, connection), revision)
        connection.commit()


def downgrade(url: str, revision: str = "base") -> None:
    with _migration_lock(url) as connection:
        command.downgrade(alembic_config(url, connection), revision)
        connection.commit()
