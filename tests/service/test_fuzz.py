"""Fuzz the OpenAPI schema: no 5xx answers, and every 4xx says what is wrong."""
from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings as hypothesis_settings

from service.app import create_app
from storage.migrate import upgrade
from storage.settings import Settings, prepare_local_folders
from tests.fixture_paths import FIXTURES
from tests.service.conftest import make_key

_var = Path(tempfile.mkdtemp(prefix="erq-fuzz-"))
SETTINGS = Settings(home=_var, database_url=f"sqlite:///{_var / 'erq.sqlite'}",
                    broker_url=f"sqla+sqlite:///{_var / 'broker.sqlite'}", artifact_dir=_var / "artifacts",
                    data_roots=str(FIXTURES), max_active_jobs_per_owner=1000)
prepare_local_folders(SETTINGS)
upgrade(SETTINGS.database_url)
KEY = make_key(SETTINGS, "fuzzer")
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(SETTINGS))


@schema.parametrize()
@hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_every_4xx_has_a_message(case):
    response = case.call(headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code < 500, (response.status_code, response.text)
    if 400 <= response.status_code < 500 and case.method.upper() != "HEAD":  # HEAD answers carry no body
        assert response.json()["detail"], response.text
