"""Files only the service's user may read: ERQ_HOME (0700), the embedded SQLite files, the key files
(0600). Each is created with its mode from the start (never world-readable for a moment) and
tightened when it already exists with a looser one (an install from before)."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

API_KEY_FILE = "api-key"  # HOME/api-key: the first API key of an embedded install (erq serve)
SECRET_KEY_FILE = "secret-key"  # HOME/secret-key: the server key when ERQ_SECRET_KEY is unset (storage/sealing.py)
FOLDER_MODE = 0o700
FILE_MODE = 0o600
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")  # SQLite gives them the database file's mode when it makes them


def private_folder(path: Path) -> None:
    """Create `path` (and its parents, as the umask says) and make it 0700."""
    path.mkdir(parents=True, exist_ok=True)
    _tighten(path, FOLDER_MODE)


def private_file(path: Path) -> None:
    """Create `path` empty if it is missing, and make it 0600."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        pass
    _tighten(path, FILE_MODE)


def private_sqlite_file(url: str) -> None:
    """The SQLite database of `url` (and its journal files, when there) as a 0600 file; others: nothing."""
    if "sqlite:///" not in url:
        return
    database = url.split("sqlite:///", 1)[1].split("?", 1)[0]
    if not database or database == ":memory:":
        return
    path = Path(database)
    if not path.parent.is_dir():
        return  # the engine's own error says so, naming the setting
    private_file(path)
    for suffix in SQLITE_COMPANIONS:
        try:
            _tighten(Path(f"{path}{suffix}"), FILE_MODE)
        except FileNotFoundError:
            pass  # absent, or removed by another process's SQLite as its transaction ended


def write_private_file(path: Path, text: str) -> bool:
    """Write `text` to a new 0600 file at `path`, all at once; False (and nothing written) when the
    file exists already, so that of two processes writing at once the first wins and both read it."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, path)  # fails if the file exists: no reader ever sees a half-written key
        return True
    except FileExistsError:
        return False
    finally:
        temporary.unlink(missing_ok=True)


def _tighten(path: Path, mode: int) -> None:
    if path.stat().st_mode & 0o777 != mode:
        os.chmod(path, mode)
