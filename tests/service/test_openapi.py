"""The OpenAPI document: valid OpenAPI 3.1, named operations, every error documented as a problem,
`status` an enum, the job parameters a typed object; and the app's real answers match it."""
from __future__ import annotations

import re

import jsonschema_rs
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from schemathesis.specs.openapi.definitions import OPENAPI_31

from erq_core.config import fields
from service.app import create_app
from storage.models import JobStatus
from tests.service.conftest import ON_SQLITE, make_key

PROBLEM_REF = {"$ref": "#/components/schemas/ProblemOut"}


@pytest.fixture
def app(settings):
    return create_app(settings)


@pytest.fixture
def document(app) -> dict:
    with TestClient(app) as client:
        return client.get("/openapi.json").json()


def operations(document: dict):
    for path, items in document["paths"].items():
        for method, operation in items.items():
            yield method, path, operation


@ON_SQLITE
def test_the_document_is_valid_openapi_3_1(document):
    assert document["openapi"].startswith("3.1")
    errors = [e.message for e in jsonschema_rs.Draft202012Validator(OPENAPI_31).iter_errors(document)]
    assert errors == []
    for name, schema in document["components"]["schemas"].items():  # each schema is itself valid JSON Schema
        jsonschema_rs.Draft202012Validator({**schema, "components": document["components"]})


@ON_SQLITE
def test_every_route_is_documented_with_a_named_operation_and_its_errors(app, document):
    documented = {(method.upper(), path) for method, path, _ in operations(document)}
    for route in app.routes:
        if isinstance(route, APIRoute) and route.include_in_schema:
            for method in route.methods:
                assert (method, route.path) in documented, (method, route.path)
    ids = [operation["operationId"] for _, _, operation in operations(document)]
    assert len(ids) == len(set(ids)) and all(re.fullmatch(r"[a-z][a-z_]+", i) for i in ids), ids
    for method, path, operation in operations(document):
        errors = {code: answer for code, answer in operation["responses"].items() if int(code) >= 400}
        assert "500" in errors, (method, path)
        if path.startswith("/v1"):
            assert {"401", "429", "503"} <= set(errors), (method, path)
        if operation.get("parameters") or operation.get("requestBody"):
            assert "422" in errors, (method, path)
        if "{job_id}" in path:
            assert "404" in errors, (method, path)
        for code, answer in errors.items():
            if (path, code) == ("/readyz", "503"):
                continue  # readiness answers its checks, not a problem
            assert answer["content"] == {"application/problem+json": {"schema": PROBLEM_REF}}, (method, path, code)
            assert answer["description"]


@ON_SQLITE
def test_status_is_an_enum_and_the_parameters_a_typed_object(document):
    schemas = document["components"]["schemas"]
    job = schemas["JobOut"]["properties"]
    assert job["status"] == {"$ref": "#/components/schemas/JobStatus"}
    assert schemas["JobStatus"]["enum"] == [s.value for s in JobStatus]
    assert job["params"] == {"$ref": "#/components/schemas/JobParams"}
    params = schemas["JobParams"]["properties"]
    rest = [spec for spec in fields() if spec.option.rest]
    assert set(params) == {spec.name for spec in rest}
    method = next(spec for spec in rest if spec.name == "method")
    assert params["w_bits"]["type"] == "integer" and params["method"]["enum"] == list(method.option.choices)
    request = schemas["JobSubmission"]["properties"]
    assert request["w_bits"]["minimum"] == 2 and request["w_bits"]["maximum"] == 8
    assert {"metadata", "webhook"} <= set(request)
    problem = schemas["ProblemOut"]
    assert {"type", "title", "status", "detail", "code"} <= set(problem["required"])


@ON_SQLITE
def test_real_error_answers_match_the_documented_problem(app, document, settings):
    validator = jsonschema_rs.Draft202012Validator({**document["components"]["schemas"]["ProblemOut"],
                                                    "components": document["components"]})
    headers = {"Authorization": f"Bearer {make_key(settings, 'alice')}"}
    with TestClient(app) as client:
        answers = [client.get("/v1/jobs"), client.get("/v1/jobs/x", headers=headers),
                   client.post("/v1/jobs", json={"model": 1}, headers=headers),
                   client.get("/v1/jobs?limit=0", headers=headers), client.delete("/v1/jobs/x", headers=headers)]
    for answer in answers:
        assert answer.status_code >= 400 and answer.headers["content-type"] == "application/problem+json"
        assert validator.is_valid(answer.json()), answer.json()
