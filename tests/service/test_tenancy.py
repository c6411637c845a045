"""Owners and keys through the real `erq admin` commands and the real API: several keys per owner,
revocation for good, prefixes as the only clear part, and the migration of keys made before owners."""
from __future__ import annotations

import re
import subprocess
import sys
import threading

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from service.app import create_app
from storage.db import engine_for, session_scope
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import run_erq, service_env
from tests.service.processes import api_client, api_process, free_port

pytestmark = pytest.mark.integration  # the real erq admin command

JOB = {"model": f"local-dir:{FIXTURE_MODEL_DIR}", "dataset": str(FIXTURE_DATASET), "val_limit": 50}


def admin(settings, tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = service_env(tmp_path, ERQ_DATABASE_URL=settings.database_url)
    return run_erq(["admin", *args], env, tmp_path)


def new_key(settings, tmp_path, owner: str) -> str:
    created = admin(settings, tmp_path, "create-key", owner)
    assert created.returncode == 0, created.stderr
    return created.stdout.strip().splitlines()[-1]


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_an_owners_keys_share_its_jobs_and_a_revoked_key_never_works_again(settings, tmp_path):
    first, second = new_key(settings, tmp_path, "alice"), new_key(settings, tmp_path, "alice")
    bobs = new_key(settings, tmp_path, "bob")
    assert first != second and first.startswith("erq_")
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/v1/jobs", json=JOB, headers=bearer(first)).json()["id"]
        assert client.get(f"/v1/jobs/{job_id}", headers=bearer(second)).status_code == 200  # rotation: no downtime
        assert client.get(f"/v1/jobs/{job_id}", headers=bearer(bobs)).status_code == 404
        assert admin(settings, tmp_path, "revoke-key", first[:12]).returncode == 0
        assert client.get("/v1/jobs", headers=bearer(first)).status_code == 401
        assert [j["id"] for j in client.get("/v1/jobs", headers=bearer(second)).json()["jobs"]] == [job_id]
        third = new_key(settings, tmp_path, "alice")  # a new key for the owner: a new token, the old stays dead
        assert client.get("/v1/jobs", headers=bearer(first)).status_code == 401
        assert client.get(f"/v1/jobs/{job_id}", headers=bearer(third)).status_code == 200


def test_list_keys_shows_id_owner_prefix_created_revoked_and_never_the_key(settings, tmp_path):
    alice, bob = new_key(settings, tmp_path, "alice"), new_key(settings, tmp_path, "bob")
    listing = admin(settings, tmp_path, "list-keys")
    assert listing.returncode == 0
    lines = listing.stdout.strip().splitlines()
    assert lines[0].split() == ["id", "owner", "prefix", "created", "revoked"]
    rows = {line.split()[2]: line.split() for line in lines[1:]}
    assert set(rows) == {alice[:12], bob[:12]} and rows[alice[:12]][1] == "alice" and rows[alice[:12]][4] == "-"
    assert alice not in listing.stdout and alice[12:20] not in listing.stdout
    key_id = rows[bob[:12]][0]
    revoked = admin(settings, tmp_path, "revoke-key", key_id)  # by id
    assert revoked.returncode == 0 and f"revoked key {key_id}" in revoked.stdout
    after = {line.split()[2]: line.split() for line in admin(settings, tmp_path, "list-keys").stdout.splitlines()[1:]}
    assert re.match(r"\d{4}-\d\d-\d\dT", after[bob[:12]][4])
    with session_scope(settings.database_url) as session:  # the key in clear is nowhere in the database
        stored = " ".join(str(v) for row in session.execute(text("SELECT * FROM api_keys")).all() for v in row)
    assert alice not in stored and alice[:12] in stored


def test_revoke_key_says_what_it_needs(settings, tmp_path):
    new_key(settings, tmp_path, "carol")
    by_owner = admin(settings, tmp_path, "revoke-key", "carol")
    assert by_owner.returncode == 2 and "'carol' is an owner" in by_owner.stderr and "list-keys" in by_owner.stderr
    assert admin(settings, tmp_path, "revoke-key", "999").returncode == 2


def test_keys_made_before_owners_become_owners_with_their_jobs(tmp_path):
    """A database at revision 0001 (keys with names, jobs per key) upgraded: each name is an owner."""
    from storage.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    upgrade(url, "0001")
    with engine_for(url).begin() as connection:
        for key_id, name in ((1, "alice"), (2, "bob")):
            connection.execute(text("INSERT INTO api_keys (id, name, key_hash, created_at) VALUES "
                                    "(:id, :name, :hash, '2026-01-01 00:00:00')"),
                               {"id": key_id, "name": name, "hash": f"{key_id:064x}"})
        connection.execute(text("INSERT INTO jobs (id, key_id, idempotency_key, status, progress, params, "
                                "cancel_requested, attempts, created_at) VALUES ('j1', 1, 'retry-1', 'succeeded', 1, "
                                "'{}', 0, 1, '2026-01-02 00:00:00')"))
        connection.execute(text("INSERT INTO artifacts (job_id, name, size, sha256) VALUES ('j1', 'x', 3, 'abc')"))
    engine_for(url).dispose()
    upgrade(url)
    from storage.models import ApiKey, Job, Owner

    with session_scope(url) as session:
        owners = {o.name: o.id for o in session.scalars(select(Owner))}
        assert set(owners) == {"alice", "bob"}
        keys = {k.id: (k.owner_id, k.prefix) for k in session.scalars(select(ApiKey))}
        assert keys == {1: (owners["alice"], None), 2: (owners["bob"], None)}
        job = session.get(Job, "j1")
        assert (job.owner_id, job.key_id, job.idempotency_key) == (owners["alice"], 1, "retry-1")
        assert job.created_at.tzinfo is not None and job.artifacts[0].size == 3


@pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)
def test_concurrent_submissions_never_pass_the_owners_active_job_limit(tmp_path, settings):
    """20 POSTs at once from two keys of one owner against a real `erq api`: exactly the limit is accepted."""
    keys = [new_key(settings, tmp_path, "alice") for _ in range(2)]
    env = service_env(tmp_path, ERQ_DATABASE_URL=settings.database_url, ERQ_BROKER_URL=settings.broker_url,
                      ERQ_MAX_ACTIVE_JOBS_PER_OWNER="3")
    statuses: list[int] = []
    barrier = threading.Barrier(20)

    def post(key: str) -> None:
        with api_client(port, key) as client:
            barrier.wait()
            statuses.append(client.post("/v1/jobs", json=JOB).status_code)

    with api_process(["api"], env, tmp_path, tmp_path / "api.log") as (api, port):
        threads = [threading.Thread(target=post, args=(keys[i % 2],)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        with api_client(port, keys[0]) as client:
            active = client.get("/v1/jobs?status=queued").json()["jobs"]
    assert sorted(statuses) == [202] * 3 + [429] * 17, statuses
    assert len(active) == 3


def test_processes_starting_together_migrate_one_at_a_time(postgres_server):
    """Six processes upgrade a fresh database at the same moment; all succeed, the schema is whole."""
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine

    from storage.migrate import alembic_config

    name = f"erq_mig_{free_port()}"
    admin_engine = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin_engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = postgres_server.rsplit("/", 1)[0] + f"/{name}"
    try:
        code = f"from storage.migrate import upgrade; upgrade({url!r})"
        processes = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
                     for _ in range(6)]
        errors = [p.communicate(timeout=120)[1] for p in processes]
        assert [p.returncode for p in processes] == [0] * 6, "\n".join(errors)[-3000:]
        engine = create_engine(url)
        with engine.connect() as connection:
            head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
            assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head]
        engine.dispose()
    finally:
        with admin_engine.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin_engine.dispose()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_another_owners_key_gets_404_from_every_download_form(settings, tmp_path):
    """GET and HEAD of an artifact, the result tar, the log (whole and by offset) and the event stream of
    alice's finished job answer 404 to bob's key, as if the job did not exist; alice's key gets them."""
    from tests.service.conftest import end_job_with_files

    alice, bob = bearer(new_key(settings, tmp_path, "alice")), bearer(new_key(settings, tmp_path, "bob"))
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/v1/jobs", json=JOB, headers=alice).json()["id"]
        end_job_with_files(settings, job_id, {"quantized.safetensors": b"q" * 64, "config.json": b"{}",
                                              "metrics.json": b"{}", "job.log": b"done\n"})
        forms = [("GET", f"/v1/jobs/{job_id}/artifacts/quantized.safetensors"),
                 ("HEAD", f"/v1/jobs/{job_id}/artifacts/config.json"), ("GET", f"/v1/jobs/{job_id}/artifacts.tar"),
                 ("GET", f"/v1/jobs/{job_id}/log"), ("GET", f"/v1/jobs/{job_id}/log?offset=2"),
                 ("GET", f"/v1/jobs/{job_id}/events")]
        for method, path in forms:
            theirs = client.request(method, path, headers=bob)
            assert theirs.status_code == 404, (method, path, theirs.status_code)
            if method == "GET":
                assert theirs.json()["code"] == "job_not_found" and b"done" not in theirs.content
            assert client.request(method, path, headers=alice).status_code in (200, 206), (method, path)
