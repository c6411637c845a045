"""ERQ_UPLOAD_TTL_DAYS (uploads no job has named for that long are removed, never one an active job
names) and deleting one owner's data (`erq admin delete-owner-data`), on SQLite and PostgreSQL."""
from __future__ import annotations

import datetime as dt

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from service.app import create_app
from storage.db import session_scope
from storage.models import Upload
from tests.service.conftest import ON_SQLITE, end_job_with_files, run_erq, service_env
from tests.upload_archives import png, small_dataset, zip_of


def upload(client, owner, settings, value: int) -> dict:
    members = {name: png(value=value + i) for i, name in enumerate(small_dataset())}
    archive = zip_of(members, settings.home / f"d{value}.zip")
    answer = client.post("/v1/datasets", content=archive.read_bytes(), headers={**owner, "Content-Type": "application/zip"})
    assert answer.status_code == 201, answer.text
    return answer.json()


def age(settings, upload_id: str, days: float) -> None:
    """Make the upload look unused for `days` (its last use moved back in the database)."""
    with session_scope(settings.database_url) as session:
        session.execute(update(Upload).where(Upload.id == upload_id).values(
            last_used_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days)))


def archive_exists(settings, item: dict) -> bool:
    return any((settings.artifact_dir / "uploads").rglob(item["sha256"]))


def test_uploads_unused_past_the_retention_go_unless_an_active_job_names_them(settings, alice):
    from storage.queue import make_celery
    from worker.sweeper import Sweeper, standard_duties

    settings = settings.model_copy(update={"upload_ttl_days": 7})
    with TestClient(create_app(settings)) as client:
        stale, named, recent = (upload(client, alice, settings, value) for value in (0, 20, 40))
        job = client.post("/v1/jobs", headers=alice, json={"model": "deit_tiny", "dataset": named["spec"],
                                                           "calib_size": 2}).json()
        for item in (stale, named):
            age(settings, item["id"], days=8)
        assert client.get(f"/v1/datasets/{recent['id']}", headers=alice).json()["expires_at"] is not None
        assert Sweeper(standard_duties(make_celery(settings), settings)).run_due()
        assert client.get(f"/v1/datasets/{stale['id']}", headers=alice).status_code == 404
        assert not archive_exists(settings, stale)
        for kept in (named, recent):  # named by a queued job; used a moment ago
            assert client.get(f"/v1/datasets/{kept['id']}", headers=alice).status_code == 200
            assert archive_exists(settings, kept)
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
        assert Sweeper(standard_duties(make_celery(settings), settings)).run_due()
        assert client.get(f"/v1/datasets/{named['id']}", headers=alice).status_code == 404


def test_naming_an_upload_in_a_job_renews_it(settings, alice):
    from storage.uploads import expire
    from storage.upload_store import open_upload_store

    with TestClient(create_app(settings)) as client:
        item = upload(client, alice, settings, 0)
        age(settings, item["id"], days=30)
        job = client.post("/v1/jobs", headers=alice, json={"model": "deit_tiny", "dataset": item["spec"],
                                                           "calib_size": 2}).json()
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
        assert expire(settings.database_url, open_upload_store(settings), 7 * 86400) == []
        assert client.get(f"/v1/datasets/{item['id']}", headers=alice).status_code == 200


def test_deleting_an_owners_data_takes_its_jobs_and_uploads_and_spares_the_others(settings, alice, bob):
    from storage.owner_data import delete_owner_data

    with TestClient(create_app(settings)) as client:
        in_use, unused, bobs = upload(client, alice, settings, 0), upload(client, alice, settings, 20), \
            upload(client, bob, settings, 40)
        ended = client.post("/v1/jobs", headers=alice, json={"model": "deit_tiny", "dataset": unused["spec"],
                                                             "calib_size": 2}).json()["id"]
        end_job_with_files(settings, ended, {"job.log": b"done\n", "config.json": b"{}"})
        queued = client.post("/v1/jobs", headers=alice, json={"model": "deit_tiny", "dataset": in_use["spec"],
                                                              "calib_size": 2}).json()["id"]
        with session_scope(settings.database_url) as session:  # a running job: it stops at its next progress step
            from storage import jobs

            jobs.claim(session, queued, "w1")
        bobs_job = client.post("/v1/jobs", headers=bob, json={"model": "deit_tiny", "dataset": bobs["spec"],
                                                              "calib_size": 2}).json()["id"]

        first = delete_owner_data(settings, owner_of(settings, "alice"))
        assert (first.jobs, first.uploads, first.cancelling, first.uploads_in_use) == (1, 1, [queued], [in_use["id"]])
        assert client.get(f"/v1/jobs/{ended}", headers=alice).status_code == 404
        assert not (settings.artifact_dir / ended).exists() and not archive_exists(settings, unused)
        assert client.get(f"/v1/jobs/{queued}", headers=alice).json()["cancel_requested"] is True
        end_job_with_files_as_worker(settings, queued)

        second = delete_owner_data(settings, owner_of(settings, "alice"))
        assert (second.jobs, second.uploads, second.cancelling, second.uploads_in_use) == (1, 1, [], [])
        assert client.get("/v1/jobs", headers=alice).json()["jobs"] == []
        assert client.get("/v1/datasets", headers=alice).json()["datasets"] == []
        assert not any((settings.artifact_dir / "uploads").rglob(in_use["sha256"]))
        assert client.get(f"/v1/jobs/{bobs_job}", headers=bob).status_code == 200  # bob keeps everything
        assert client.get(f"/v1/datasets/{bobs['id']}", headers=bob).status_code == 200 and archive_exists(settings, bobs)


def owner_of(settings, name: str) -> int:
    from storage.keys import owner_named

    with session_scope(settings.database_url) as session:
        return owner_named(session, name).id


def end_job_with_files_as_worker(settings, job_id: str) -> None:
    """The running job's worker sees the cancel and ends it."""
    from storage import jobs
    from storage.models import JobStatus

    with session_scope(settings.database_url) as session:
        assert jobs.finish(session, job_id, JobStatus.CANCELLED, jobs.CANCELLED, worker="w1", error_code="cancelled")


@ON_SQLITE
@pytest.mark.integration
def test_erq_admin_delete_owner_data_says_what_it_did_and_what_remains(settings, tmp_path, alice):
    env = service_env(tmp_path, ERQ_DATABASE_URL=settings.database_url, ERQ_ARTIFACT_DIR=str(settings.artifact_dir))
    with TestClient(create_app(settings)) as client:
        item = upload(client, alice, settings, 0)
        client.post("/v1/jobs", headers=alice, json={"model": "deit_tiny", "dataset": item["spec"], "calib_size": 2})
    unknown = run_erq(["admin", "delete-owner-data", "nobody"], env, tmp_path)
    assert unknown.returncode == 2 and "no owner 'nobody'" in unknown.stderr
    done = run_erq(["admin", "delete-owner-data", "alice"], env, tmp_path)
    # The queued job is cancelled at once (it never started), so one run removes everything.
    assert done.returncode == 0, done.stderr
    assert "deleted 1 ended job(s) with their files and 1 upload(s)" in done.stdout
    assert not archive_exists(settings, item)
