"""Webhooks with a real receiver on 127.0.0.1: signed POSTs, retries with backoff, giving up,
no redirects, time-outs, a response cap, the host allow-list, and a real worker's sweeper."""
from __future__ import annotations

import datetime as dt
import json
import time

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from worker.webhook_delivery import SENDERS_PER_OWNER, WebhookDuty
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR
from tests.service.conftest import ON_SQLITE, make_key, run_erq, service_env
from tests.service.processes import api_client, api_process, erq_process, wait_for_job
from tests.service.webhook_receiver import Receiver, verify

pytestmark = pytest.mark.integration  # the real erq admin command, a real worker

JOB = {"model": f"local-dir:{FIXTURE_MODEL_DIR}", "dataset": str(FIXTURE_DATASET), "val_limit": 50}


@pytest.fixture
def hooked(settings):
    return settings.model_copy(update={"webhook_allowed_hosts": "127.0.0.1", "webhook_timeout_seconds": 1.0,
                                       "webhook_retry_seconds": 30})


@pytest.fixture
def alice(hooked) -> dict:
    return {"Authorization": f"Bearer {make_key(hooked, 'alice')}"}


def webhook_secret(settings, tmp_path, owner: str = "alice") -> str:
    """Through the real command, as an administrator would."""
    env = service_env(tmp_path, ERQ_DATABASE_URL=settings.database_url, ERQ_BROKER_URL=settings.broker_url)
    made = run_erq(["admin", "webhook-secret", owner], env, tmp_path)
    assert made.returncode == 0, made.stderr
    assert "not shown again" in made.stdout
    return made.stdout.strip().splitlines()[-1]


def sweep_until(duty: WebhookDuty, client, headers, job_id: str, done, seconds: float = 30) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        duty()
        time.sleep(0.2)
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if done(job["webhook"]["deliveries"]):
            return job
    raise AssertionError(f"deliveries did not settle: {job['webhook']}")


def settled(deliveries) -> bool:
    return bool(deliveries) and all(d["state"] != "pending" for d in deliveries)


def test_a_cancelled_job_is_posted_signed_and_the_delivery_recorded(hooked, alice, tmp_path):
    secret = webhook_secret(hooked, tmp_path)
    with Receiver() as receiver, TestClient(create_app(hooked)) as client:
        job = client.post("/v1/jobs", json={**JOB, "webhook": {"url": receiver.url + "/hooks?x=1",
                                                               "events": ["cancelled"]}}, headers=alice).json()
        assert job["webhook"] == {"url": receiver.url + "/hooks?x=1", "events": ["cancelled"], "deliveries": []}
        duty = WebhookDuty(hooked)
        duty()
        duty.drain()
        assert receiver.received == []  # queued is not one of its events
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
        job = sweep_until(duty, client, alice, job["id"], settled)
    [request] = receiver.received
    assert request.path == "/hooks?x=1" and request.headers["Erq-Event"] == "cancelled"
    assert request.headers["Content-Type"] == "application/json"
    assert verify(secret, request) and not verify(secret + "x", request)
    body = json.loads(request.body)
    assert body["id"] == job["id"] and body["status"] == "cancelled" and body["params"]["val_limit"] == 50
    [delivery] = job["webhook"]["deliveries"]
    assert delivery["state"] == "delivered" and delivery["status_code"] == 200 and delivery["attempts"] == 1
    assert delivery["event"] == "cancelled" and request.headers["Erq-Delivery"] == str(delivery["id"])


def test_failed_attempts_are_retried_with_backoff_then_delivered(hooked, alice, tmp_path):
    webhook_secret(hooked, tmp_path)
    with Receiver([500, 503, 200]) as receiver, TestClient(create_app(hooked)) as client:
        job_id = client.post("/v1/jobs", json={**JOB, "webhook": {"url": receiver.url}}, headers=alice).json()["id"]
        client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
        job = sweep_until(WebhookDuty(hooked), client, alice, job_id, settled)
    [delivery] = job["webhook"]["deliveries"]
    assert delivery["state"] == "delivered" and delivery["attempts"] == 3 and delivery["status_code"] == 200
    gaps = [b.at - a.at for a, b in zip(receiver.received, receiver.received[1:])]
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9  # 1 s, then 2 s


def test_a_receiver_that_keeps_failing_is_given_up_after_the_retry_time(hooked, alice, tmp_path):
    hooked = hooked.model_copy(update={"webhook_retry_seconds": 2.5})
    webhook_secret(hooked, tmp_path)
    with Receiver([500]) as receiver, TestClient(create_app(hooked)) as client:
        job_id = client.post("/v1/jobs", json={**JOB, "webhook": {"url": receiver.url}}, headers=alice).json()["id"]
        client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
        job = sweep_until(WebhookDuty(hooked), client, alice, job_id, settled)
    [delivery] = job["webhook"]["deliveries"]
    assert delivery["state"] == "given_up" and delivery["status_code"] == 500 and "500" in delivery["error"]
    assert 2 <= delivery["attempts"] == len(receiver.received) <= 3


def test_redirects_are_not_followed(hooked, alice, tmp_path):
    webhook_secret(hooked, tmp_path)
    with Receiver() as target, Receiver([("redirect", "http://127.0.0.1:1/elsewhere")]) as receiver, \
            TestClient(create_app(hooked.model_copy(update={"webhook_retry_seconds": 1}))) as client:
        receiver.answers = [("redirect", target.url + "/stolen")]
        job_id = client.post("/v1/jobs", json={**JOB, "webhook": {"url": receiver.url}}, headers=alice).json()["id"]
        client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
        job = sweep_until(WebhookDuty(hooked.model_copy(update={"webhook_retry_seconds": 1})), client, alice,
                          job_id, settled)
    assert target.received == []
    delivery = job["webhook"]["deliveries"][0]
    assert delivery["status_code"] == 302 and "redirects are not followed" in delivery["error"]


def test_the_duty_returns_while_its_attempts_are_still_being_sent(hooked, alice, tmp_path):
    webhook_secret(hooked, tmp_path)
    patient = hooked.model_copy(update={"webhook_timeout_seconds": 30})
    with Receiver([("held", 60)]) as held, TestClient(create_app(patient)) as client:
        job_id = client.post("/v1/jobs", json={**JOB, "webhook": {"url": held.url}}, headers=alice).json()["id"]
        client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
        duty = WebhookDuty(patient)
        assert duty() == 1
        assert sum(duty.in_flight.values()) == 1  # the POST runs in the duty's own thread, still unanswered
        [pending] = client.get(f"/v1/jobs/{job_id}", headers=alice).json()["webhook"]["deliveries"]
        assert pending["state"] == "pending" and pending["attempts"] == 1 and pending["error"] is None
        held.release()
        duty.drain()
        [delivery] = client.get(f"/v1/jobs/{job_id}", headers=alice).json()["webhook"]["deliveries"]
    assert delivery["state"] == "delivered" and delivery["status_code"] == 200


def test_a_slow_or_endless_receiver_is_cut_at_the_time_out(hooked, alice, tmp_path):
    """The slow receiver would answer 200 after 5 s: its timed-out outcome shows the 1 s cut. The endless
    answer is read up to the cap (or the time-out), then the connection is closed."""
    webhook_secret(hooked, tmp_path)
    quick = hooked.model_copy(update={"webhook_retry_seconds": 1})
    with Receiver([("slow", 5)]) as slow, Receiver([("endless", 200)]) as endless, \
            TestClient(create_app(quick)) as client:
        slow_job = client.post("/v1/jobs", json={**JOB, "webhook": {"url": slow.url}}, headers=alice).json()["id"]
        endless_job = client.post("/v1/jobs", json={**JOB, "webhook": {"url": endless.url}},
                                  headers=alice).json()["id"]
        for job_id in (slow_job, endless_job):
            client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
        duty = WebhookDuty(quick)
        assert duty() == 2
        duty.drain()
        slow_delivery = client.get(f"/v1/jobs/{slow_job}", headers=alice).json()["webhook"]["deliveries"][0]
        endless_delivery = client.get(f"/v1/jobs/{endless_job}", headers=alice).json()["webhook"]["deliveries"][0]
    assert slow_delivery["status_code"] is None and "timed out" in slow_delivery["error"]
    assert endless_delivery["status_code"] == 200 and endless_delivery["state"] == "delivered"


@pytest.mark.parametrize("update, webhook, code", [
    ({"webhook_allowed_hosts": ""}, {"url": "http://127.0.0.1:9/x"}, "webhooks_disabled"),
    ({}, {"url": "http://169.254.169.254/latest/meta-data"}, "webhook_host_not_allowed"),
    ({}, {"url": "http://localhost:9/x"}, "webhook_host_not_allowed"),
    ({}, {"url": "ftp://127.0.0.1/x"}, "invalid_webhook_url"),
    ({}, {"url": "http://user:pw@127.0.0.1/x"}, "invalid_webhook_url"),
    ({}, {"url": "http://127.0.0.1:99999/x"}, "invalid_webhook_url"),
    ({"webhook_allowed_hosts": "*.example.com"}, {"url": f"http://{'a' * 64}.example.com/x"}, "invalid_webhook_url"),
    ({"webhook_allowed_hosts": "*.example.com"}, {"url": "http://a..example.com/x"}, "invalid_webhook_url"),
    ({"webhook_allowed_hosts": "*.example.com"}, {"url": f"http://{'a.' * 125}example.com/x"}, "invalid_webhook_url"),
    ({}, {"url": "http://127.0.0.1:9/x", "events": ["exploded"]}, "validation_error"),
    ({}, {"url": "http://127.0.0.1:9/x", "events": []}, "validation_error"),
    ({}, {"url": "http://127.0.0.1:9/x"}, "webhook_secret_missing"),
])
def test_webhooks_are_refused_unless_enabled_allowed_and_signed(hooked, alice, update, webhook, code):
    with TestClient(create_app(hooked.model_copy(update=update))) as client:
        answer = client.post("/v1/jobs", json={**JOB, "webhook": webhook}, headers=alice)
    assert answer.status_code == 422 and answer.json()["code"] == code, answer.json()
    assert answer.json()["field"].startswith("webhook")


@ON_SQLITE
def test_a_real_worker_delivers_the_webhooks_of_a_real_job(tmp_path, hooked):
    key = make_key(hooked, "alice")
    secret = webhook_secret(hooked, tmp_path)
    env = service_env(tmp_path, ERQ_DATABASE_URL=hooked.database_url, ERQ_BROKER_URL=hooked.broker_url,
                      ERQ_WEBHOOK_ALLOWED_HOSTS="127.0.0.1")
    with Receiver() as receiver, erq_process(["worker"], env, tmp_path, tmp_path / "worker.log"), \
            api_process(["api"], env, tmp_path, tmp_path / "api.log") as (api, port):
        with api_client(port, key) as client:
            plain_id = client.post("/v1/jobs", json=JOB).json()["id"]  # no webhook: must not stop the others
            assert client.post(f"/v1/jobs/{plain_id}/cancel").status_code < 300
            job_id = client.post("/v1/jobs", json={**JOB, "webhook": {"url": receiver.url,
                                                                      "events": ["running", "succeeded"]}}).json()["id"]
            assert wait_for_job(client, job_id, ("succeeded", "failed"), 240)["status"] == "succeeded"
            deadline = time.monotonic() + 30
            while not any(r.headers["Erq-Event"] == "succeeded" for r in receiver.received):
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
                time.sleep(0.2)
            job = client.get(f"/v1/jobs/{job_id}").json()
            health = run_erq(["worker", "--healthcheck"], env, tmp_path)
            assert health.returncode == 0, health.stderr
    final = next(r for r in receiver.received if r.headers["Erq-Event"] == "succeeded")
    assert verify(secret, final)
    body = json.loads(final.body)
    assert body["status"] == "succeeded" and body["metrics"]["quantized"]["top1"] == job["metrics"]["quantized"]["top1"]
    assert {a["name"] for a in body["artifacts"]} >= {"quantized.safetensors", "config.json"}
    assert {r.headers["Erq-Event"] for r in receiver.received} <= {"running", "succeeded"}
    assert any(d["event"] == "succeeded" and d["state"] == "delivered" for d in job["webhook"]["deliveries"])


def test_jobs_without_a_webhook_do_not_stop_the_deliveries_of_jobs_that_have_one(hooked, alice, tmp_path):
    """A job with no webhook is stored as SQL NULL, so the sweep neither announces it nor fails on it."""
    from sqlalchemy import func, select

    from storage.db import session_scope
    from storage.models import Job

    webhook_secret(hooked, tmp_path)
    bob = {"Authorization": f"Bearer {make_key(hooked, 'bob')}"}
    with Receiver() as receiver, TestClient(create_app(hooked)) as client:
        plain = [client.post("/v1/jobs", json=JOB, headers=headers).json()["id"] for headers in (alice, bob)]
        hooked_id = client.post("/v1/jobs", json={**JOB, "webhook": {"url": receiver.url}}, headers=alice).json()["id"]
        for job_id, headers in zip([*plain, hooked_id], (alice, bob, alice)):
            assert client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).json()["status"] == "cancelled"
        job = sweep_until(WebhookDuty(hooked), client, alice, hooked_id, settled)
        assert client.get(f"/v1/jobs/{plain[0]}", headers=alice).json()["webhook"] is None
    with session_scope(hooked.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.webhook.is_(None))) == 2
    [delivery] = job["webhook"]["deliveries"]
    assert delivery["state"] == "delivered" and [r.headers["Erq-Event"] for r in receiver.received] == ["cancelled"]


def test_the_migration_turns_stored_json_nulls_into_sql_nulls(settings):
    """Rows written before revision 0005 held the JSON text 'null' for "no webhook"."""
    from sqlalchemy import text

    from storage.db import engine_for
    from storage.migrate import downgrade, upgrade

    downgrade(settings.database_url, "0004")
    engine = engine_for(settings.database_url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO owners (id, name, created_at) VALUES (1, 'alice', '2026-01-01 00:00:00')"))
        for job_id, webhook in (("old-none", "null"), ("old-hook", '{"url": "http://127.0.0.1:9/x"}')):
            connection.execute(text(
                "INSERT INTO jobs (id, owner_id, status, progress, params, cancel_requested, attempts, created_at, "
                "webhook, metadata, metrics) VALUES (:id, 1, 'succeeded', 1, '{}', false, 1, '2026-01-02 00:00:00', "
                ":webhook, 'null', 'null')"), {"id": job_id, "webhook": webhook})
    engine.dispose()
    upgrade(settings.database_url)
    with engine_for(settings.database_url).connect() as connection:
        rows = dict(connection.execute(text(
            "SELECT id, webhook IS NULL AND metadata IS NULL AND metrics IS NULL FROM jobs")).all())
        kept = connection.execute(text("SELECT CAST(webhook AS TEXT) FROM jobs WHERE id = 'old-hook'")).scalar()
    assert rows == {"old-none": True, "old-hook": False}
    assert json.loads(kept) == {"url": "http://127.0.0.1:9/x"}


def submit_cancelled(client, headers, url: str) -> str:
    """A job with a webhook to `url`, cancelled at once: its `cancelled` event is due at the next sweep."""
    job_id = client.post("/v1/jobs", json={**JOB, "webhook": {"url": url}}, headers=headers).json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).json()["status"] == "cancelled"
    return job_id


def delivery_rows(settings, job_id: str) -> list[dict]:
    """The job's outbox rows as stored, timestamps and lease included."""
    from sqlalchemy import select

    from storage.db import session_scope
    from storage.models import WebhookDelivery

    with session_scope(settings.database_url) as session:
        rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                               .order_by(WebhookDelivery.id))
        return [{column: getattr(row, column) for column in ("id", "attempts", "status_code", "last_error", "lease",
                                                             "last_attempt_at", "next_attempt_at", "delivered_at",
                                                             "given_up_at")} for row in rows]


def wait_for(condition, seconds: float = 30, what: str = "the condition"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {seconds} s")


def test_an_attempt_to_a_trickling_receiver_is_cut_at_its_deadline(hooked, alice, tmp_path):
    """The receiver answers its status line, then one header byte every 0.2 s: no single read waits the
    1 s time-out, so only a deadline on the whole attempt (connect + send + read) ends it."""
    webhook_secret(hooked, tmp_path)
    with Receiver([("trickle", 0.2)]) as receiver, TestClient(create_app(hooked)) as client:
        job_id = submit_cancelled(client, alice, receiver.url)
        assert WebhookDuty(hooked)() == 1  # one attempt claimed; no further sweep, so no second attempt
        [row] = wait_for(lambda: [r for r in delivery_rows(hooked, job_id) if r["last_error"]], what="an outcome")
        assert not receiver.released.is_set()  # the receiver was still trickling when the attempt ended
    assert row["attempts"] == 1 == len(receiver.received) and not receiver.received[0].completed
    assert row["status_code"] is None and "ERQ_WEBHOOK_TIMEOUT_SECONDS=1" in row["last_error"]
    assert row["lease"] is None and row["delivered_at"] is None and row["given_up_at"] is None
    # Recorded 1 s (the first backoff) before its next attempt: the attempt lasted its 1 s deadline.
    lasted = (row["next_attempt_at"] - dt.timedelta(seconds=1) - row["last_attempt_at"]).total_seconds()
    assert 1.0 <= lasted < 10, lasted


def test_four_trickling_receivers_of_one_owner_do_not_delay_another_owners_delivery(hooked, alice, tmp_path):
    slow = hooked.model_copy(update={"webhook_timeout_seconds": 30})  # alice's attempts stay in flight
    webhook_secret(slow, tmp_path, "alice")
    bob = {"Authorization": f"Bearer {make_key(slow, 'bob')}"}
    webhook_secret(slow, tmp_path, "bob")
    with Receiver([("trickle", 0.2)]) as r1, Receiver([("trickle", 0.2)]) as r2, \
            Receiver([("trickle", 0.2)]) as r3, Receiver([("trickle", 0.2)]) as r4, Receiver() as bobs, \
            TestClient(create_app(slow)) as client:
        trickling = [r1, r2, r3, r4]
        alices = [submit_cancelled(client, alice, r.url) for r in trickling]  # due first
        bobs_job = submit_cancelled(client, bob, bobs.url)
        duty = WebhookDuty(slow)

        def bob_delivered():
            duty()
            return [r for r in delivery_rows(slow, bobs_job) if r["delivered_at"]]

        wait_for(bob_delivered, 20, "bob's delivery")
        alice_rows = [row for job_id in alices for row in delivery_rows(slow, job_id)]
        assert not any(r.released.is_set() for r in trickling)
        for receiver in trickling:
            receiver.release()
        duty.drain()
    assert [r.headers["Erq-Event"] for r in bobs.received] == ["cancelled"]
    # Alice's attempts were all still in flight (none had an outcome) when bob's was delivered, and at
    # most SENDERS_PER_OWNER of them were running: the rest wait for her own senders, not bob's.
    assert all(r["last_error"] is None and r["delivered_at"] is None for r in alice_rows)
    in_flight = [r for r in alice_rows if r["attempts"] == 1]
    assert 1 <= len(in_flight) <= SENDERS_PER_OWNER and all(r["lease"] for r in in_flight)
    assert len(in_flight) == sum(len(r.received) for r in trickling)


def test_held_deliveries_are_each_delivered_once_when_their_receivers_recover(hooked, alice, tmp_path):
    """Attempts cut at their deadline are retried one at a time per row; once the receivers answer,
    each delivery is made once, and each row ends delivered, not also given up."""
    webhook_secret(hooked, tmp_path)
    with Receiver([("trickle", 0.2)]) as r1, Receiver([("trickle", 0.2)]) as r2, \
            Receiver([("trickle", 0.2)]) as r3, Receiver([("trickle", 0.2)]) as r4, \
            TestClient(create_app(hooked)) as client:
        trickling = [r1, r2, r3, r4]
        job_ids = [submit_cancelled(client, alice, r.url) for r in trickling]
        duty = WebhookDuty(hooked)

        def rows():
            return [row for job_id in job_ids for row in delivery_rows(hooked, job_id)]

        def each_cut_twice():
            duty()
            return all(r["attempts"] >= 2 and r["last_error"] and r["lease"] is None for r in rows())

        wait_for(each_cut_twice, 60, "two cut attempts per delivery")
        for receiver in trickling:
            receiver.release()

        def all_delivered():
            duty()
            return all(r["delivered_at"] for r in rows())

        wait_for(all_delivered, 60, "every delivery")
        duty.drain()
        final = rows()
    for row, receiver in zip(final, trickling):
        assert row["given_up_at"] is None and row["lease"] is None and row["status_code"] == 200
        assert {r.headers["Erq-Delivery"] for r in receiver.received} == {str(row["id"])}
        assert len(receiver.received) == row["attempts"] >= 3  # one request per attempt, no duplicates
        assert sum(r.completed for r in receiver.received) == 1


def test_only_the_holder_of_a_delivery_s_lease_records_its_outcome(hooked, alice, tmp_path):
    """An attempt whose lease ran out (its sweeper stalled) and was claimed again can no longer record
    anything: the row ends with the current attempt's outcome only, never delivered and given up."""
    from storage.db import session_scope
    from storage.models import WebhookDelivery, db_now
    from worker.webhook_delivery import announce, claim_due, record

    webhook_secret(hooked, tmp_path)
    with TestClient(create_app(hooked)) as client:
        job_id = submit_cancelled(client, alice, "http://127.0.0.1:9/x")
    with session_scope(hooked.database_url) as session:
        assert announce(session) == 1
    with session_scope(hooked.database_url) as session:
        [stale] = claim_due(session, hold_seconds=60, slots=lambda owner: 1)
    with session_scope(hooked.database_url) as session:
        assert claim_due(session, hold_seconds=60, slots=lambda owner: 1) == []  # leased: not due
        session.get(WebhookDelivery, stale.delivery_id).next_attempt_at = db_now(-1)  # the lease runs out
    with session_scope(hooked.database_url) as session:
        [current] = claim_due(session, hold_seconds=60, slots=lambda owner: 1)
    assert current.delivery_id == stale.delivery_id and current.lease != stale.lease
    given_up = hooked.model_copy(update={"webhook_retry_seconds": 0.001})
    with session_scope(hooked.database_url) as session:
        assert record(session, current, None, "answered 500", given_up)
    with session_scope(hooked.database_url) as session:
        assert not record(session, stale, 200, None, given_up)  # too late: not its lease any more
    [row] = delivery_rows(hooked, job_id)
    assert row["given_up_at"] is not None and row["delivered_at"] is None and row["status_code"] is None
    assert row["attempts"] == 2 and row["last_error"] == "answered 500" and row["lease"] is None


def test_an_unencodable_host_ends_each_attempt_with_the_reason_and_is_given_up_on_time(hooked, alice, tmp_path):
    """A URL stored before hosts were checked at submission: a 64-character label raises UnicodeError
    while connecting. Each attempt records it; the delivery is given up when the retry time is over."""
    from storage.db import session_scope
    from storage.models import Job

    brief = hooked.model_copy(update={"webhook_allowed_hosts": "*.example.com,127.0.0.1",
                                      "webhook_retry_seconds": 2.5})
    webhook_secret(brief, tmp_path)
    bad = f"http://{'a' * 64}.example.com/hook"
    with TestClient(create_app(brief)) as client:
        job_id = client.post("/v1/jobs", json={**JOB, "webhook": {"url": "http://127.0.0.1:9/x"}},
                             headers=alice).json()["id"]
        with session_scope(brief.database_url) as session:
            session.get(Job, job_id).webhook = {"url": bad, "events": ["cancelled"]}
        client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
        job = sweep_until(WebhookDuty(brief), client, alice, job_id, settled)
    [delivery] = job["webhook"]["deliveries"]
    assert delivery["state"] == "given_up" and delivery["attempts"] >= 2 and delivery["status_code"] is None
    assert "UnicodeError" in delivery["error"] and "label" in delivery["error"]
