"""Webhook signing secrets sealed at rest under the server key: the migration seals the secrets a
database kept in clear, a delivery is still signed with the clear secret, another key cannot open
them, and downgrading gives the clear secrets back. On SQLite and PostgreSQL."""
from __future__ import annotations

import pytest
from sqlalchemy import text

from storage.db import engine_for
from storage.migrate import downgrade, upgrade
from storage.sealing import new_key
from worker.webhook_delivery import Attempt, post
from tests.service.webhook_receiver import Receiver, verify

pytestmark = pytest.mark.integration  # PostgreSQL

CLEAR = "whsec_" + "k" * 43  # what `erq admin webhook-secret` made before secrets were sealed


def stored_secrets(url: str) -> dict[str, str]:
    with engine_for(url).connect() as connection:
        return dict(connection.execute(text("SELECT name, webhook_secret FROM owners ORDER BY name")).all())


def delivery(secret: str, url: str) -> Attempt:
    return Attempt(delivery_id=1, job_id="j1", owner_id=1, event="succeeded", url=url, body=b'{"id":"j1"}',
                   secret=secret, lease="l", number=1)


@pytest.fixture
def at_0007(database_url, tmp_path, monkeypatch):
    """A database at revision 0007 whose owner `alice` has a clear secret (and `bob` none), and the
    server key this process's migrations use (ERQ_SECRET_KEY, as the erq commands read it)."""
    key = new_key()
    monkeypatch.setenv("ERQ_SECRET_KEY", key)
    upgrade(database_url, "0007")
    with engine_for(database_url).begin() as connection:
        connection.execute(text("INSERT INTO owners (name, created_at, webhook_secret) VALUES "
                                "('alice', CURRENT_TIMESTAMP, :secret), ('bob', CURRENT_TIMESTAMP, NULL)"),
                           {"secret": CLEAR})
    return database_url, key


def test_the_migration_seals_clear_secrets_and_deliveries_still_verify(at_0007, tmp_path):
    from storage.settings import Settings

    url, key = at_0007
    upgrade(url)
    stored = stored_secrets(url)
    assert stored["bob"] is None
    assert stored["alice"].startswith("sealed:") and CLEAR not in stored["alice"]
    settings = Settings(home=tmp_path / "home", database_url=url, secret_key=key,
                        webhook_allowed_hosts="127.0.0.1", webhook_timeout_seconds=5)
    with Receiver() as receiver:
        assert post(delivery(stored["alice"], receiver.url), settings) == (200, None)
        other = settings.model_copy(update={"secret_key": new_key()})
        status, error = post(delivery(stored["alice"], receiver.url), other)
    [request] = receiver.received  # nothing is sent unsigned when the secret cannot be opened
    assert verify(CLEAR, request)
    assert status is None and "another server key" in error
    upgrade(url)  # again: nothing left to seal, nothing sealed twice
    assert stored_secrets(url) == stored


def test_downgrading_gives_the_clear_secrets_back(at_0007):
    url, _ = at_0007
    upgrade(url)
    downgrade(url, "0007")
    assert stored_secrets(url) == {"alice": CLEAR, "bob": None}
