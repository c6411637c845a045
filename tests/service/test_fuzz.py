"""Fuzz every route from the OpenAPI schema, on SQLite (in process, unit lane) and PostgreSQL: no
answer is a 5xx, every answer fits the schema (a documented status, its media type, its body and
headers), and every 4xx says what is wrong. Seeded: a failure comes back on the next run."""
from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, seed
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_headers_conformance,
                                 response_schema_conformance, status_code_conformance)

from service.app import create_app
from tests.service.conftest import end_job_with_files, make_key
from tests.service.test_api import JOB

FILES = {"config.json": b'{"w_bits": 4}', "job.log": b"started\nended\n", "metrics.json": b"{}",
         "quantized.safetensors": b"\x00" * 4096}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]


@pytest.fixture
def fuzz_settings(settings):
    # No per-owner rate limit: the fuzzer is one owner sending thousands of requests.
    return settings.model_copy(update={"max_active_jobs_per_owner": 1000, "owner_requests_per_second": 0})


@pytest.fixture
def fuzz_key(fuzz_settings) -> str:
    return make_key(fuzz_settings, "fuzzer")


@pytest.fixture
def fuzz_app(fuzz_settings):
    return create_app(fuzz_settings)


@pytest.fixture
def ended_job(fuzz_app, fuzz_settings, fuzz_key) -> str:
    """A job of the fuzzer's that has ended with files: the job routes are fuzzed on it as well."""
    with TestClient(fuzz_app) as client:
        job_id = client.post("/v1/jobs", json=JOB, headers={"Authorization": f"Bearer {fuzz_key}"}).json()["id"]
    end_job_with_files(fuzz_settings, job_id, FILES)
    return job_id


@pytest.fixture
def api_schema(fuzz_app, ended_job):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request):
    """Schemathesis 4.32's lazy schemas read `node._nodeid`, which pytest 9 no longer has."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@seed(19)
@hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_route_answers_5xx_and_every_answer_fits_the_schema(case, fuzz_key, ended_job):
    headers = {"Authorization": f"Bearer {fuzz_key}"}
    _check(case, case.call(headers=headers))
    generated = dict(case.path_parameters or {})
    if "job_id" in generated and case.method.upper() != "DELETE":  # the same input on a job that exists
        name = generated.get("name")
        case.path_parameters = {**generated, "job_id": ended_job,
                                **({"name": sorted(FILES)[len(str(name)) % len(FILES)]} if name is not None else {})}
        _check(case, case.call(headers=headers))


def _check(case, response) -> None:
    case.validate_response(response, checks=CHECKS)
    if 400 <= response.status_code < 500 and case.method.upper() != "HEAD":  # HEAD answers carry no body
        assert response.json()["detail"], response.text
