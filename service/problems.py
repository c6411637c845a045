"""RFC 9457 problem details: every 4xx/5xx answer is `application/problem+json` with `type`, `title`,
`status`, `detail`, `instance` and a stable machine-readable `code` (README, "Error codes");
validation errors also name the offending `field` (and list every one in `errors`).

Routes raise `Problem(status, code, detail)`; the handlers installed by `install` turn it, and
FastAPI's own HTTP and validation errors, into that body."""
from __future__ import annotations

from http import HTTPStatus
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from storage.artifacts import ArtifactStoreError
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:erq:problem:"

# The codes a status answers with when a route raised a plain HTTPException (FastAPI's own 404/405).
DEFAULT_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 409: "conflict", 410: "gone", 413: "body_too_large",
                 415: "unsupported_media_type", 416: "range_not_satisfiable", 422: "invalid_request",
                 429: "too_many_requests", 500: "internal_error", 503: "unavailable"}


class Problem(Exception):
    """An error answer. `code` is stable (clients branch on it); `detail` says what to do."""

    def __init__(self, status: int, code: str, detail: str, headers: Optional[dict[str, str]] = None,
                 field: Optional[str] = None, **extra: Any):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers, self.field = status, code, detail, headers, field
        self.extra = extra


class FieldError(BaseModel):
    field: str = Field(description="the offending field, dotted for nested ones (`webhook.url`)")
    message: str


class ProblemOut(BaseModel):
    """An RFC 9457 problem; see the README's error codes."""

    type: str = Field(description=f"`{TYPE_PREFIX}CODE`")
    title: str = Field(description="the HTTP status phrase")
    status: int
    detail: str = Field(description="what went wrong and what to do")
    code: str = Field(description="stable machine-readable code")
    instance: Optional[str] = Field(None, description="the request path")
    field: Optional[str] = Field(None, description="validation errors: the (first) offending field")
    errors: Optional[list[FieldError]] = Field(None, description="validation errors: every offending field")
    limit: Optional[float] = Field(None, description="429 of a per-owner limit: the limit that was reached")


def problem_body(status: int, code: str, detail: str, instance: Optional[str] = None,
                 field: Optional[str] = None, **extra: Any) -> dict[str, Any]:
    body = {"type": TYPE_PREFIX + code, "title": _title(status), "status": status, "detail": detail, "code": code}
    if instance is not None:
        body["instance"] = instance
    if field is not None:
        body["field"] = field
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def problem_response(status: int, code: str, detail: str, request: Optional[Request] = None,
                     headers: Optional[dict[str, str]] = None, field: Optional[str] = None,
                     **extra: Any) -> JSONResponse:
    instance = request.url.path if request is not None else None
    return JSONResponse(problem_body(status, code, detail, instance, field, **extra), status_code=status,
                        headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _field_name(location: tuple) -> str:
    """('body', 'webhook', 'url') -> 'webhook.url'; ('query', 'limit') -> 'limit'."""
    parts = [str(p) for p in location[1:]] if location and location[0] in ("body", "query", "path", "header") \
        else [str(p) for p in location]
    return ".".join(parts) or (str(location[0]) if location else "body")


def validation_problem(exc: RequestValidationError, request: Request) -> JSONResponse:
    errors = [{"field": _field_name(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")}
              for e in exc.errors()]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "the request is malformed"
    return problem_response(422, "validation_error", detail, request,
                            field=errors[0]["field"] if errors else None, errors=errors)


def install(app: FastAPI) -> None:
    """Every error the app answers becomes a problem."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.code, exc.detail, request, exc.headers, exc.field, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        code = DEFAULT_CODES.get(exc.status_code, "error")
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; see /docs"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; see /docs"
        return problem_response(exc.status_code, code, detail, request, dict(exc.headers or {}) or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_problem(exc, request)

    @app.exception_handler(OperationalError)
    async def _database_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
        return problem_response(503, "database_unavailable", "the database is unreachable; retry later", request,
                                {"Retry-After": "10"})

    @app.exception_handler(PoolTimeout)
    async def _database_busy(request: Request, exc: PoolTimeout) -> JSONResponse:
        return problem_response(503, "database_busy", "every database connection of this API process is in use "
                                                      "(ERQ_DATABASE_POOL_SIZE); retry after Retry-After seconds",
                                request, {"Retry-After": "5"})

    @app.exception_handler(ArtifactStoreError)
    async def _artifact_store_unavailable(request: Request, exc: ArtifactStoreError) -> JSONResponse:
        return problem_response(503, "artifact_store_unavailable", "the artifact store is unreachable; retry later",
                                request, {"Retry-After": "10"})

    @app.exception_handler(IntegrityError)
    async def _conflicting_write(request: Request, exc: IntegrityError) -> JSONResponse:
        return problem_response(409, "conflict", "the request conflicted with a concurrent change and was not "
                                                 "stored; send it again", request)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return problem_response(500, "internal_error", "the server failed to answer; the error is logged, "
                                                       "retry later or report it", request)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for error statuses, each a problem."""
    descriptions = {400: "bad request", 401: "missing, invalid or revoked API key", 404: "no such job for this owner",
                    409: "conflict with the job's state", 410: "gone", 413: "request body over 64 KiB",
                    416: "offset past the end", 422: "invalid request (see `field`)",
                    429: "too many failed authentications, requests, event streams or active jobs (see `code`)",
                    500: "internal error", 503: "the database or the queue is unreachable or busy; retry later"}
    return {status: {"description": descriptions.get(status, _title(status)),
                     "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ProblemOut"}}}}
            for status in statuses}


def add_schemas(openapi: dict[str, Any]) -> dict[str, Any]:
    """Put ProblemOut (referenced by every error response) into the document's components."""
    schema = ProblemOut.model_json_schema(ref_template="#/components/schemas/{model}")
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    components.update(schema.pop("$defs", {}))
    components["ProblemOut"] = schema
    return openapi
