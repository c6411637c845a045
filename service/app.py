"""The FastAPI application. It speaks HTTP only: it enqueues jobs through the light queue client
(storage/queue.py) and never imports the worker package, torch or the engine."""
from __future__ import annotations

from typing import Optional

from fastapi import FastAPI

from service import problems
from service.guards import BodySizeLimit, FailedAuthThrottle, OwnerRequestRate
from service.routes import jobs, system, ui, uploads
from storage.artifacts import open_store
from storage.queue import make_celery
from storage.settings import Settings, get_settings


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="erq", version="0.1.0",
                  description="Quantization-as-a-service for Vision Transformers (ERQ). "
                              "Every /v1 route needs `Authorization: Bearer KEY`. Errors are RFC 9457 "
                              "problems (`application/problem+json`) with a stable `code`.",
                  generate_unique_id_function=lambda route: route.name)  # operation ids: the handlers' names
    app.state.settings = settings
    app.state.celery = make_celery(settings)
    app.state.artifact_store = open_store(settings)
    app.state.auth_throttle = FailedAuthThrottle()
    app.state.owner_request_rate = OwnerRequestRate(settings.owner_requests_per_second, settings.owner_request_burst)
    app.add_middleware(BodySizeLimit, exempt=uploads.UPLOAD_PATHS)
    app.include_router(jobs.router)
    app.include_router(uploads.router)  # before system's GET /v1/models: /v1/models/uploads is more specific
    app.include_router(system.router)
    app.include_router(ui.router)

    problems.install(app)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = problems.add_schemas(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi
    return app
