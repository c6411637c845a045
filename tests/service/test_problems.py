"""Every 4xx/5xx answer is an RFC 9457 problem with a stable code, through a real HTTP client."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import ON_SQLITE, make_key

JOB = {"model": f"local-dir:{FIXTURE_MODEL_DIR}", "dataset": str(FIXTURE_DATASET), "val_limit": 50}


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def alice(settings) -> dict:
    return {"Authorization": f"Bearer {make_key(settings, 'alice')}"}


def assert_problem(answer, status: int, code: str, field: str | None = None) -> dict:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    body = answer.json()
    assert body["status"] == status and body["code"] == code and body["type"] == f"urn:erq:problem:{code}"
    assert body["title"] and body["detail"]
    if field is not None:
        assert body["field"] == field, body
    return body


@ON_SQLITE
@pytest.mark.parametrize("changes, code, field", [
    ({"dataset": "/etc"}, "path_outside_roots", "dataset"),
    ({"dataset": "tests/fixtures/fmnist16"}, "invalid_path", "dataset"),
    ({"checkpoint": "/etc/passwd"}, "path_outside_roots", "checkpoint"),
    ({"model": "local-dir:/etc"}, "path_outside_roots", "model"),
    ({"model": "resnet50"}, "unknown_model", "model"),
    ({"model": "hf-hub:someone/vit"}, "model_not_allowed", "model"),
    ({"w_bits": 9}, "validation_error", "w_bits"),
    ({"method": "gptq"}, "validation_error", "method"),
    ({"colour": "blue"}, "validation_error", "colour"),
])
def test_a_refused_job_names_its_code_and_field(client, alice, changes, code, field):
    body = assert_problem(client.post("/v1/jobs", json={**JOB, **changes}, headers=alice), 422, code, field)
    assert body["instance"] == "/v1/jobs"


@ON_SQLITE
def test_a_dataset_without_val_is_invalid_dataset(client, alice, data_root):
    (data_root / "half" / "train" / "a").mkdir(parents=True)
    assert_problem(client.post("/v1/jobs", json={**JOB, "dataset": str(data_root / "half")}, headers=alice),
                   422, "invalid_dataset", "dataset")


@ON_SQLITE
def test_validation_errors_list_every_offending_field(client, alice):
    body = assert_problem(client.post("/v1/jobs", json={**JOB, "w_bits": 1, "a_bits": "x"}, headers=alice),
                          422, "validation_error")
    assert {e["field"] for e in body["errors"]} == {"w_bits", "a_bits"}
    assert "w_bits" in body["detail"] and "a_bits" in body["detail"]
    assert_problem(client.get("/v1/jobs?limit=1000", headers=alice), 422, "validation_error", "limit")


@ON_SQLITE
def test_authentication_and_missing_things_have_codes(client, alice):
    assert_problem(client.get("/v1/jobs"), 401, "missing_api_key")
    assert_problem(client.get("/v1/jobs", headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key")
    assert_problem(client.get("/v1/jobs/abc", headers=alice), 404, "job_not_found")
    assert_problem(client.get("/v1/nothing-here", headers=alice), 404, "not_found")
    assert_problem(client.put("/v1/jobs", headers=alice), 405, "method_not_allowed")
    assert_problem(client.get("/v1/jobs?cursor=garbage", headers=alice), 422, "invalid_cursor", "cursor")


@ON_SQLITE
def test_limits_and_conflicts_have_codes(client, alice, settings):
    for _ in range(settings.max_active_jobs_per_owner):
        assert client.post("/v1/jobs", json=JOB, headers=alice).status_code == 202
    assert_problem(client.post("/v1/jobs", json=JOB, headers=alice), 429, "too_many_active_jobs")
    job_id = client.get("/v1/jobs", headers=alice).json()["jobs"][0]["id"]
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
    assert cancelled.json()["status"] == "cancelled"
    assert_problem(client.post(f"/v1/jobs/{job_id}/cancel", headers=alice), 409, "job_finished")
    client.post("/v1/jobs", json=JOB, headers={**alice, "Idempotency-Key": "k"})
    assert_problem(client.post("/v1/jobs", json={**JOB, "w_bits": 3}, headers={**alice, "Idempotency-Key": "k"}),
                   422, "idempotency_key_reused")
    assert_problem(client.post("/v1/jobs", content=b"x" * 70_000, headers=alice), 413, "body_too_large")


@ON_SQLITE
def test_an_unreachable_database_and_queue_have_codes(tmp_path, alice, settings):
    down = settings.model_copy(update={"database_url": "postgresql+psycopg://nobody@127.0.0.1:1/none"})
    with TestClient(create_app(down)) as client:
        body = assert_problem(client.get("/v1/jobs", headers=alice), 503, "database_unavailable")
        assert "retry" in body["detail"]
    no_queue = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(no_queue)) as client:
        answer = client.post("/v1/jobs", json=JOB, headers=alice)
        assert_problem(answer, 503, "queue_unavailable")
        assert answer.headers["Retry-After"]


@ON_SQLITE
def test_an_unexpected_error_is_a_problem_too(client, alice, settings):
    from sqlalchemy import text

    from storage.db import engine_for

    job_id = client.post("/v1/jobs", json=JOB, headers=alice).json()["id"]
    with engine_for(settings.database_url).begin() as connection:  # a row the code cannot read
        connection.execute(text("UPDATE jobs SET params = 'not json'"))
    answer = client.get(f"/v1/jobs/{job_id}", headers=alice)
    assert answer.status_code == 500
    assert answer.json()["code"] == "internal_error" and "JSON" not in answer.text  # no internals leak
