"""The REST API through a real HTTP client against the app, on SQLite and PostgreSQL."""
from __future__ import annotations

import logging
import os

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from storage.artifacts import ArtifactStoreError
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import ON_POSTGRESQL, ON_SQLITE, make_key

JOB = {"model": f"local-dir:{FIXTURE_MODEL_DIR}", "dataset": str(FIXTURE_DATASET), "val_limit": 50}


def submit(client, headers, **changes):
    return client.post("/v1/jobs", json={**JOB, **changes}, headers=headers)


def test_every_v1_route_needs_a_key(client):
    paths = client.get("/openapi.json").json()["paths"]
    v1_routes = {(method.upper(), path) for path, operations in paths.items() if path.startswith("/v1")
                 for method in operations}
    assert ("GET", "/v1/models") in v1_routes and ("HEAD", "/v1/jobs/{job_id}/artifacts/{name}") in v1_routes
    for method, path in sorted(v1_routes):
        answer = client.request(method, path.replace("{job_id}", "x").replace("{name}", "config.json"))
        assert answer.status_code == 401, (method, path)
        assert method == "HEAD" or "API key" in answer.json()["detail"]
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_submit_follow_and_list(client, alice):
    answer = submit(client, alice, w_bits=3)
    assert answer.status_code == 202
    job = answer.json()
    assert job["status"] == "queued" and job["progress"] == 0 and job["params"]["w_bits"] == 3
    assert job["params"]["coe"] == 10000 and job["params"]["calib_size"] == 32 and job["params"]["method"] == "erq"
    assert answer.headers["Location"].endswith(f"/v1/jobs/{job['id']}")
    fetched = client.get(answer.headers["Location"], headers=alice).json()
    assert fetched["id"] == job["id"] and fetched["artifacts"] == [] and fetched["created_at"].endswith(("Z", "+00:00"))


def test_a_job_takes_an_accuracy_budget_in_points_of_top1(client, alice):
    answer = submit(client, alice, max_drop=1.5, method="erq+")
    assert answer.status_code == 202 and answer.json()["params"]["max_drop"] == 1.5
    assert submit(client, alice).json()["params"]["max_drop"] is None


def test_polling_with_the_etag_answers_304_until_the_job_changes(client, alice):
    location = submit(client, alice).headers["Location"]
    first = client.get(location, headers=alice)
    etag = first.headers["ETag"]
    unchanged = client.get(location, headers={**alice, "If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.headers["ETag"] == etag and unchanged.content == b""
    assert client.get(location, headers={**alice, "If-None-Match": '"stale", ' + etag}).status_code == 304
    cancelled = client.post(location + "/cancel", headers=alice).json()
    changed = client.get(location, headers={**alice, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag
    assert changed.json()["status"] == cancelled["status"] == "cancelled"


def test_another_keys_job_is_not_found(client, alice, bob):
    job_id = submit(client, alice).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=bob).status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=bob).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/log", headers=bob).status_code == 404
    assert client.get("/v1/jobs", headers=bob).json()["jobs"] == []


@pytest.mark.parametrize("changes, message", [
    ({"dataset": "/etc"}, "outside the allowed data roots"),
    ({"dataset": f"{FIXTURE_DATASET}/../../../../etc"}, "outside the allowed data roots"),
    ({"dataset": "tests/fixtures/fmnist16"}, "must be an absolute path"),
    ({"dataset": "/tmp/\x00evil"}, "NUL"),
    ({"model": "local-dir:/etc"}, "outside the allowed data roots"),
    ({"checkpoint": "/etc/passwd"}, "outside the allowed data roots"),
    ({"model": "resnet50"}, "unknown model"),
    ({"w_bits": 9}, "less than or equal to 8"),
    ({"a_bits": 1}, "greater than or equal to 2"),
    ({"method": "gptq"}, "'erq', 'erq+', 'repq' or 'rtn'"),  # the choices of ErqConfig.method
    ({"colour": "blue"}, "Extra inputs are not permitted"),
    ({"calib_size": "many"}, "valid integer"),
    ({"max_drop": -1}, "greater than or equal to 0"),
])
def test_bad_jobs_are_refused_with_a_message(client, alice, changes, message):
    answer = submit(client, alice, **changes)
    assert answer.status_code == 422
    assert message in str(answer.json()["detail"])
    assert client.get("/v1/jobs", headers=alice).json()["jobs"] == []  # nothing was queued


def test_links_out_of_the_roots_are_refused(client, alice, data_root, tmp_path):
    outside = tmp_path / "outside"
    (outside / "train").mkdir(parents=True)
    (outside / "val").mkdir()
    (data_root / "escape").symlink_to(outside)
    answer = submit(client, alice, dataset=str(data_root / "escape"))
    assert answer.status_code == 422 and "outside the allowed data roots" in answer.json()["detail"]


def test_dataset_without_val_is_refused(client, alice, data_root):
    (data_root / "half" / "train" / "a").mkdir(parents=True)
    answer = submit(client, alice, dataset=str(data_root / "half"))
    assert answer.status_code == 422 and "has no 'val' folder" in answer.json()["detail"]


def test_idempotency_key_returns_the_same_job(client, alice):
    first = client.post("/v1/jobs", json=JOB, headers={**alice, "Idempotency-Key": "abc"})
    again = client.post("/v1/jobs", json=JOB, headers={**alice, "Idempotency-Key": "abc"})
    other = client.post("/v1/jobs", json=JOB, headers={**alice, "Idempotency-Key": "def"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]
    assert len(client.get("/v1/jobs", headers=alice).json()["jobs"]) == 2


def test_listing_is_newest_first_and_paginated(client, alice, settings):
    from storage.db import session_scope
    from storage.models import Job

    ids = [submit(client, alice).json()["id"] for _ in range(3)]
    with session_scope(settings.database_url) as session:  # make room under the active-jobs limit
        for job_id in ids:
            session.get(Job, job_id).status = "succeeded"
    ids += [submit(client, alice).json()["id"] for _ in range(2)]
    page = client.get("/v1/jobs?limit=2", headers=alice).json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    seen = [j["id"] for j in page["jobs"]]
    while page["next_cursor"]:
        page = client.get(f"/v1/jobs?limit=2&cursor={page['next_cursor']}", headers=alice).json()
        seen += [j["id"] for j in page["jobs"]]
    assert seen == ids[::-1]
    queued = client.get("/v1/jobs?status=queued", headers=alice).json()["jobs"]
    assert [j["id"] for j in queued] == ids[::-1][:2]
    assert client.get("/v1/jobs?status=weird", headers=alice).status_code == 422
    assert client.get("/v1/jobs?cursor=garbage", headers=alice).status_code == 422


def test_cancel_a_queued_job(client, alice):
    job_id = submit(client, alice).json()["id"]
    answer = client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=alice).status_code == 409


def test_active_jobs_per_owner_are_limited_across_its_keys(client, alice, bob, settings):
    alices_second_key = {"Authorization": f"Bearer {make_key(settings, 'alice')}"}
    for headers in (alice, alices_second_key, alice):
        assert submit(client, headers).status_code == 202
    refused = submit(client, alices_second_key)
    assert refused.status_code == 429 and "ERQ_MAX_ACTIVE_JOBS_PER_OWNER" in refused.json()["detail"]
    assert submit(client, bob).status_code == 202


def test_no_artifact_before_the_job_finishes(client, alice):
    job_id = submit(client, alice).json()["id"]
    for name in ("quantized.safetensors", "../../etc/passwd", "job.log", "..%2F..%2Fetc%2Fpasswd",
                 "%2Fetc%2Fpasswd", "sub%2Fjob.log", "job.log%00"):
        assert client.get(f"/v1/jobs/{job_id}/artifacts/{name}", headers=alice).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/log", headers=alice).text == ""


def test_models_health_readiness_and_metrics(client, alice):
    models = {m["alias"]: m for m in client.get("/v1/models", headers=alice).json()}
    assert models["deit_small"] == {"alias": "deit_small", "timm_name": "deit_small_patch16_224", "kind": "alias",
                                    "allowed": True, "note": None}
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["database"] == ready.json()["broker"] == ready.json()["artifact_store"] == "ok"
    submit(client, alice)
    text = client.get("/metrics").text
    assert 'erq_jobs{status="queued"} 1.0' in text
    assert "erq_queue_depth 1.0" in text and "erq_job_duration_seconds_bucket" in text


def test_openapi_documents_the_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/artifacts/{name}",
            "/v1/jobs/{job_id}/log", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_unreachable_database_answers_503(tmp_path, alice, settings):
    from storage.settings import Settings

    broken = Settings(**{**settings.model_dump(), "database_url": "postgresql+psycopg://nobody@127.0.0.1:1/none"})
    with TestClient(create_app(broken)) as client:
        assert client.get("/readyz").status_code == 503
        answer = client.post("/v1/jobs", json=JOB, headers=alice)
        assert answer.status_code == 503 and answer.headers["Retry-After"]


def test_an_unreachable_queue_answers_503_and_keeps_no_job(tmp_path, alice, settings):
    from storage.settings import Settings

    retry = {**alice, "Idempotency-Key": "one-job"}
    broken = Settings(**{**settings.model_dump(), "broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as client:
        answer = client.post("/v1/jobs", json=JOB, headers=retry)
        assert answer.status_code == 503 and answer.headers["Retry-After"] and "queue" in answer.json()["detail"]
        assert client.get("/v1/jobs", headers=alice).json()["jobs"] == []
    with TestClient(create_app(settings)) as client:  # the queue is back: the same retry is a new, queued job
        answer = client.post("/v1/jobs", json=JOB, headers=retry)
        assert answer.status_code == 202 and answer.json()["status"] == "queued"


@ON_SQLITE
def test_an_artifact_folder_that_is_a_file_is_not_ready(tmp_path, settings, caplog):
    """ERQ_ARTIFACT_DIR naming a regular file (tests run as root: permission bits would not stop them)."""
    from storage.artifacts.folder import FolderStore
    from storage.settings import Settings

    not_a_folder = tmp_path / "artifacts-file"
    not_a_folder.write_text("not a folder")
    ops_key = make_key(settings, "ops")
    caplog.set_level(logging.WARNING, logger="erq.api")
    for path in (not_a_folder, not_a_folder / "below"):
        with pytest.raises(ArtifactStoreError, match=f"{path}.*ERQ_ARTIFACT_DIR"):
            FolderStore(path).check(write=True)
        broken = Settings(**{**settings.model_dump(), "artifact_dir": path})
        with TestClient(create_app(broken)) as client:
            anonymous = client.get("/readyz")  # a load balancer's probe: no key
            assert anonymous.status_code == 503 and anonymous.headers["Retry-After"] == "10"
            checks = anonymous.json()
            assert checks["status"] == "not ready" and checks["database"] == checks["broker"] == "ok"
            assert checks["artifact_store"].startswith("unavailable") and str(tmp_path) not in anonymous.text
            wrong_key = client.get("/readyz", headers={"Authorization": "Bearer erq_not-a-valid-key-0000"})
            assert str(tmp_path) not in wrong_key.text
            keyed = client.get("/readyz", headers={"Authorization": f"Bearer {ops_key}"}).json()
            assert keyed["artifact_store"].startswith("unavailable: ") and str(path) in keyed["artifact_store"]
        reasons = [r.getMessage() for r in caplog.records if r.name == "erq.api" and "not ready" in r.getMessage()]
        assert len(reasons) == 1 and str(path) in reasons[0]  # logged once for three probes
        caplog.clear()


@ON_SQLITE
def test_the_write_check_of_an_artifact_folder_leaves_nothing_behind(settings):
    from storage.artifacts.folder import FolderStore

    before = set(settings.artifact_dir.iterdir())
    FolderStore(settings.artifact_dir).check(write=True)
    assert set(settings.artifact_dir.iterdir()) == before


def test_migrations_go_down_and_up_again(settings):
    from sqlalchemy import inspect

    from storage.db import engine_for
    from storage.migrate import downgrade, upgrade

    downgrade(settings.database_url)
    engine_for(settings.database_url).dispose()
    assert set(inspect(engine_for(settings.database_url)).get_table_names()) <= {"alembic_version"}
    upgrade(settings.database_url)
    engine_for(settings.database_url).dispose()
    assert {"jobs", "api_keys", "artifacts"} <= set(inspect(engine_for(settings.database_url)).get_table_names())


def test_bodies_over_64_kib_are_refused(client, alice):
    answer = client.post("/v1/jobs", content=b'{"model": "' + b"x" * 70_000 + b'"}',
                         headers={**alice, "Content-Type": "application/json"})
    assert answer.status_code == 413 and "64 KiB" in answer.json()["detail"]


@pytest.mark.parametrize("changes", [{"calib_size": 10**9}, {"val_limit": 10**12}, {"w_bits": "four"},
                                     {"coe": -1}, {"model": 5}, {"dataset": None}])
def test_wrong_types_and_huge_values_are_4xx(client, alice, changes):
    answer = submit(client, alice, **changes)
    assert answer.status_code == 422 and answer.json()["detail"]


def test_repeated_failed_authentication_is_slowed_but_a_valid_key_is_never_throttled(client, alice):
    for _ in range(10):
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer guess"}).status_code == 401
    blocked = client.get("/v1/jobs", headers={"Authorization": "Bearer guess"})
    assert blocked.status_code == 429 and blocked.headers["Retry-After"]
    assert client.get("/v1/jobs", headers=alice).status_code == 200  # the same address (a proxy, a NAT)
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer guess"}).status_code == 429


def test_the_failed_authentication_throttle_remembers_a_bounded_number_of_addresses(client):
    throttle = client.app.state.auth_throttle
    for i in range(3 * throttle.max_clients):
        throttle.failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    assert len(throttle.failures) == throttle.max_clients
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer guess"}).status_code == 401
    assert len(throttle.failures) == throttle.max_clients


def test_keys_are_stored_hashed(settings, alice):
    from sqlalchemy import select

    from storage.db import session_scope
    from storage.models import ApiKey

    raw = alice["Authorization"].split()[1]
    with session_scope(settings.database_url) as session:
        stored = session.execute(select(ApiKey.key_hash, ApiKey.prefix)).one()
    assert raw not in stored.key_hash and len(stored.key_hash) == 64 and stored.prefix == raw[:12]


def _claim_with_a_silent_worker(settings, job_id: str) -> None:
    from storage import jobs
    from storage.db import session_scope
    from storage.models import Job, db_now

    with session_scope(settings.database_url) as session:
        assert jobs.claim(session, job_id, "lost-host:1") is not None
        session.get(Job, job_id).heartbeat_at = db_now(-(settings.lease_seconds + 60))


def _sweep(settings) -> None:
    from storage.queue import make_celery
    from worker.sweeper import Sweeper, standard_duties

    assert Sweeper(standard_duties(make_celery(settings), settings)).run_due()


def _messages_on_the_broker(settings) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(settings.broker_url.removeprefix("sqla+"))
    with engine.connect() as connection:
        count = connection.execute(text("SELECT count(*) FROM kombu_message")).scalar()
    engine.dispose()
    return count


def test_reads_only_read_and_the_sweeper_requeues_a_job_whose_worker_went_silent(client, alice, settings):
    job_id = submit(client, alice).json()["id"]
    _claim_with_a_silent_worker(settings, job_id)
    for _ in range(2):
        job = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
        listed = client.get("/v1/jobs", headers=alice).json()["jobs"][0]
        assert job["status"] == listed["status"] == "running" and job["attempts"] == 1
    assert _messages_on_the_broker(settings) == 1  # the submit's only: a read sends nothing
    _sweep(settings)
    job = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert job["status"] == "queued" and job["stage"] == "requeued after worker loss" and job["attempts"] == 1
    assert _messages_on_the_broker(settings) == 2  # the submit's, and the re-queue's


def test_reads_never_touch_the_broker_so_they_answer_while_it_is_down(alice, settings):
    from tests.service.tcp_proxy import CountingListener

    with TestClient(create_app(settings)) as client:
        job_id = submit(client, alice).json()["id"]
    _claim_with_a_silent_worker(settings, job_id)
    broker = CountingListener()  # a broker address that drops every connection, and counts them
    with TestClient(create_app(settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{broker.port}/0"}))) \
            as client:
        for _ in range(5):
            assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["status"] == "running"
            assert client.get("/v1/jobs", headers=alice).status_code == 200
    broker.close()
    assert broker.count == 0


def test_the_sweeper_fails_a_silent_workers_job_on_its_last_attempt(alice, settings):
    settings = settings.model_copy(update={"max_attempts": 1})
    with TestClient(create_app(settings)) as client:
        job_id = submit(client, alice).json()["id"]
        _claim_with_a_silent_worker(settings, job_id)
        _sweep(settings)
        failed = client.get("/v1/jobs", headers=alice).json()["jobs"][0]
        assert failed["status"] == "failed" and "lost-host:1 stopped answering" in failed["error"]
        assert failed["heartbeat_at"] is not None


def test_an_idempotency_key_reused_with_a_different_body_is_refused(client, alice):
    first = client.post("/v1/jobs", json=JOB, headers={**alice, "Idempotency-Key": "k1"})
    same = client.post("/v1/jobs", json={**JOB, "w_bits": 4}, headers={**alice, "Idempotency-Key": "k1"})  # the default
    other = client.post("/v1/jobs", json={**JOB, "w_bits": 3}, headers={**alice, "Idempotency-Key": "k1"})
    assert first.status_code == same.status_code == 202 and first.json()["id"] == same.json()["id"]
    assert other.status_code == 422 and "'k1' was already used for a different request" in other.json()["detail"]
    assert len(client.get("/v1/jobs", headers=alice).json()["jobs"]) == 1


@ON_SQLITE
def test_a_conflicting_insert_without_an_idempotency_key_answers_409_not_500(client, alice, settings):
    from sqlalchemy import text

    from storage.db import engine_for

    with engine_for(settings.database_url).begin() as connection:  # the database refuses every new job
        connection.execute(text("CREATE TRIGGER refuse_jobs BEFORE INSERT ON jobs "
                                "BEGIN SELECT RAISE(ABORT, 'UNIQUE constraint failed: jobs.id'); END"))
    answer = submit(client, alice)
    assert answer.status_code == 409 and "send the request again" in answer.json()["detail"]


def test_a_chunked_body_over_64_kib_answers_413(client, alice):
    def chunks():
        yield b'{"model": "'
        for _ in range(10):
            yield b"x" * 8192
        yield b'"}'

    answer = client.post("/v1/jobs", content=chunks(), headers={**alice, "Content-Type": "application/json"})
    assert answer.status_code == 413 and "64 KiB" in answer.json()["detail"]
    small = client.post("/v1/jobs", content=iter([b'{"model": "deit_small", ', b'"dataset": "/nowhere"}']),
                        headers={**alice, "Content-Type": "application/json"})
    assert small.status_code == 422 and "outside the allowed data roots" in small.json()["detail"]


def _finished_job(client, headers, settings, size: int | None = None) -> dict:
    """A job submitted through the API and ended by the job-state code the worker uses, with files."""
    from tests.service.conftest import end_job_with_files

    job_id = submit(client, headers).json()["id"]
    end_job_with_files(settings, job_id, {"config.json": b'{"w_bits": 4}', "job.log": b"done\n",
                                          "metrics.json": b"{}", "quantized.safetensors": size or 1000})
    return client.get(f"/v1/jobs/{job_id}", headers=headers).json()


def test_artifacts_answer_head_and_if_none_match(client, alice, settings):
    job = _finished_job(client, alice, settings)
    config = next(a for a in job["artifacts"] if a["name"] == "config.json")
    head = client.head(config["url"], headers=alice)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(config["size"]) and head.headers["ETag"] == f'"{config["sha256"]}"'
    unchanged = client.get(config["url"], headers={**alice, "If-None-Match": head.headers["ETag"]})
    assert unchanged.status_code == 304 and unchanged.content == b"" and unchanged.headers["ETag"] == head.headers["ETag"]
    assert client.get(config["url"], headers={**alice, "If-None-Match": '"other"'}).content == b'{"w_bits": 4}'


def test_an_artifact_whose_file_is_missing_answers_410_artifact_missing_from_every_route(client, alice, settings):
    from storage.artifacts.folder import FolderStore

    job = _finished_job(client, alice, settings)
    folder = FolderStore(settings.artifact_dir).run_dir(job["id"], "attempt-1")
    (folder / "metrics.json").unlink()
    url = next(a["url"] for a in job["artifacts"] if a["name"] == "metrics.json")
    for method in ("GET", "HEAD"):
        answer = client.request(method, url, headers=alice)
        assert answer.status_code == 410, (method, answer.status_code)
    for answer in (client.get(url, headers=alice), client.get(f"/v1/jobs/{job['id']}/artifacts.tar", headers=alice)):
        assert answer.status_code == 410 and answer.json()["code"] == "artifact_missing", answer.json()
        assert "no longer in the artifact store" in answer.json()["detail"]


def test_a_byte_range_is_served_and_a_range_this_api_does_not_serve_is_ignored(client, alice, settings):
    from tests.service.conftest import assert_range_answers, end_job_with_files

    checkpoint = os.urandom(5000)
    job_id = submit(client, alice).json()["id"]
    end_job_with_files(settings, job_id, {"quantized.safetensors": checkpoint, "job.log": b"done\n"})
    assert_range_answers(client, f"/v1/jobs/{job_id}/artifacts/quantized.safetensors", checkpoint, alice)


@ON_POSTGRESQL
def test_artifacts_over_2_gib_are_recorded_and_served(client, alice, settings):
    size = 2**31 + 5
    job = _finished_job(client, alice, settings, size=size)
    checkpoint = next(a for a in job["artifacts"] if a["name"] == "quantized.safetensors")
    assert checkpoint["size"] == size
    assert client.head(checkpoint["url"], headers=alice).headers["content-length"] == str(size)


def test_a_running_job_shows_that_a_cancel_is_pending(client, alice, settings):
    from storage import jobs
    from storage.db import session_scope

    job_id = submit(client, alice).json()["id"]
    with session_scope(settings.database_url) as session:
        jobs.claim(session, job_id, "w1")
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["cancel_requested"] is False
    answer = client.post(f"/v1/jobs/{job_id}/cancel", headers=alice).json()
    assert answer["status"] == "running" and answer["cancel_requested"] is True
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["cancel_requested"] is True


def test_hub_models_are_refused_unless_erq_allowed_models_names_them(client, alice, settings):
    refused = submit(client, alice, model="hf-hub:someone/forty-gigabytes")
    assert refused.status_code == 422 and "ERQ_ALLOWED_MODELS" in refused.json()["detail"]
    assert submit(client, alice, model="vit_base_patch16_224").status_code == 422  # a timm name, not an alias
    assert submit(client, alice, model="deit_tiny").status_code == 202  # aliases are allowed by default
    opened = settings.model_copy(update={"allowed_models": "@aliases,local-dir:*,hf-hub:timm/*,vit_*"})
    with TestClient(create_app(opened)) as other:
        assert submit(other, alice, model="hf-hub:timm/deit_tiny_patch16_224.fb_in1k").status_code == 202
        assert submit(other, alice, model="vit_base_patch16_224").status_code == 202
        assert submit(other, alice, model="hf-hub:someone/forty-gigabytes").status_code == 422


def test_models_lists_what_is_accepted_and_what_is_enabled(client, alice, settings):
    models = client.get("/v1/models", headers=alice).json()
    by_kind = {kind: [m for m in models if m["kind"] == kind] for kind in ("alias", "timm", "hf-hub", "local-dir")}
    assert len(by_kind["alias"]) == 8 and all(m["allowed"] for m in by_kind["alias"])
    assert any(m["alias"] == "deit_small_patch16_224" and not m["allowed"] for m in by_kind["timm"])
    assert [m["allowed"] for m in by_kind["hf-hub"]] == [False] and [m["allowed"] for m in by_kind["local-dir"]] == [True]
    opened = settings.model_copy(update={"allowed_models": "hf-hub:timm/*"})
    with TestClient(create_app(opened)) as other:
        listed = other.get("/v1/models", headers=alice).json()
        hub = next(m for m in listed if m["kind"] == "hf-hub")
        assert hub["allowed"] and "hf-hub:timm/*" in hub["note"]
        assert not any(m["allowed"] for m in listed if m["kind"] != "hf-hub")
