"""Job metadata and listing filters (status, model, creation time, metadata, after/limit, has_more),
on SQLite and PostgreSQL through a real HTTP client."""
from __future__ import annotations

import datetime as dt

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from storage.db import session_scope
from storage.models import Job
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import make_key

JOB = {"model": f"local-dir:{FIXTURE_MODEL_DIR}", "dataset": str(FIXTURE_DATASET), "val_limit": 50}


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings.model_copy(update={"max_active_jobs_per_owner": 100}))) as client:
        yield client


def ids(answer) -> list[str]:
    assert answer.status_code == 200, answer.text
    return [job["id"] for job in answer.json()["jobs"]]


def test_metadata_is_stored_returned_and_filterable(client, alice):
    labelled = client.post("/v1/jobs", json={**JOB, "metadata": {"team": "vision", "run": "a.1"}}, headers=alice)
    assert labelled.status_code == 202 and labelled.json()["metadata"] == {"team": "vision", "run": "a.1"}
    other = client.post("/v1/jobs", json={**JOB, "metadata": {"team": "audio"}}, headers=alice).json()
    plain = client.post("/v1/jobs", json=JOB, headers=alice).json()
    assert plain["metadata"] is None and "metadata" not in plain["params"]
    job_id = labelled.json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["metadata"]["run"] == "a.1"
    assert ids(client.get("/v1/jobs", params={"metadata[team]": "vision"}, headers=alice)) == [job_id]
    assert ids(client.get("/v1/jobs", params={"metadata[team]": "audio"}, headers=alice)) == [other["id"]]
    assert ids(client.get("/v1/jobs", params={"metadata[team]": "vision", "metadata[run]": "b"}, headers=alice)) == []
    assert ids(client.get("/v1/jobs", params={"metadata[nothing]": "x"}, headers=alice)) == []
    bad = client.get("/v1/jobs", params={"metadata[bad key]": "x"}, headers=alice)
    assert bad.status_code == 422 and bad.json()["field"] == "metadata[bad key]"


@pytest.mark.parametrize("metadata, field", [
    ({f"k{i}": "v" for i in range(17)}, "metadata"),
    ({"k" * 65: "v"}, "metadata"),
    ({"bad key": "v"}, "metadata"),
    ({"k": "v" * 513}, "metadata.k"),
    ({"k": 3}, "metadata.k"),
    ("labels", "metadata"),
])
def test_metadata_out_of_bounds_is_refused_naming_the_field(client, alice, metadata, field):
    answer = client.post("/v1/jobs", json={**JOB, "metadata": metadata}, headers=alice)
    assert answer.status_code == 422 and answer.json()["code"] == "validation_error"
    assert answer.json()["field"].startswith(field), answer.json()


def test_metadata_is_part_of_the_idempotent_request(client, alice):
    first = client.post("/v1/jobs", json={**JOB, "metadata": {"a": "1"}}, headers={**alice, "Idempotency-Key": "m"})
    again = client.post("/v1/jobs", json={**JOB, "metadata": {"a": "1"}}, headers={**alice, "Idempotency-Key": "m"})
    other = client.post("/v1/jobs", json={**JOB, "metadata": {"a": "2"}}, headers={**alice, "Idempotency-Key": "m"})
    assert first.json()["id"] == again.json()["id"] and other.json()["code"] == "idempotency_key_reused"


def test_listing_filters_by_status_model_and_creation_time(client, alice, settings, data_root):
    first = client.post("/v1/jobs", json=JOB, headers=alice).json()
    second = client.post("/v1/jobs", json={**JOB, "w_bits": 3}, headers=alice).json()
    client.post(f"/v1/jobs/{first['id']}/cancel", headers=alice)
    with session_scope(settings.database_url) as session:  # first was made an hour earlier
        session.get(Job, first["id"]).created_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
        other_model = session.get(Job, second["id"])
        other_model.params = {**other_model.params, "model": "deit_tiny"}
    assert ids(client.get("/v1/jobs?status=cancelled", headers=alice)) == [first["id"]]
    assert ids(client.get("/v1/jobs?status=cancelled&status=queued", headers=alice)) == [second["id"], first["id"]]
    assert ids(client.get("/v1/jobs", params={"model": "deit_tiny"}, headers=alice)) == [second["id"]]
    assert ids(client.get("/v1/jobs", params={"model": first["params"]["model"]}, headers=alice)) == [first["id"]]
    half_an_hour_ago = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=30)).isoformat()
    assert ids(client.get("/v1/jobs", params={"created_after": half_an_hour_ago}, headers=alice)) == [second["id"]]
    assert ids(client.get("/v1/jobs", params={"created_before": half_an_hour_ago}, headers=alice)) == [first["id"]]
    naive = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=30)).replace(tzinfo=None).isoformat()
    assert ids(client.get("/v1/jobs", params={"created_before": naive}, headers=alice)) == [first["id"]]  # UTC
    assert client.get("/v1/jobs?created_after=yesterday", headers=alice).json()["field"] == "created_after"


def test_pages_follow_after_and_say_has_more(client, alice):
    made = [client.post("/v1/jobs", json=JOB, headers=alice).json()["id"] for _ in range(5)][::-1]  # newest first
    page = client.get("/v1/jobs?limit=2", headers=alice).json()
    seen, pages = [j["id"] for j in page["jobs"]], 1
    while page["has_more"]:
        page = client.get("/v1/jobs", params={"limit": 2, "after": seen[-1]}, headers=alice).json()
        seen += [j["id"] for j in page["jobs"]]
        pages += 1
    assert seen == made and pages == 3 and page["next_cursor"] is None
    exact = client.get("/v1/jobs?limit=5", headers=alice).json()
    assert len(exact["jobs"]) == 5 and exact["has_more"] is False
    bob = {"Authorization": f"Bearer {make_key(client.app.state.settings, 'bob')}"}
    answer = client.get("/v1/jobs", params={"after": made[0]}, headers=bob)  # not bob's job
    assert answer.status_code == 422 and answer.json()["field"] == "after"
