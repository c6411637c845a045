"""The FastAPI application. It speaks HTTP only: it enqueues jobs through the light queue client
(storage/queue.py) and never imports the worker package, torch or the engine."""
from __future__ import annotations

from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError, OperationalError

from service.guards import BodySizeLimit, FailedAuthThrottle
from service.routes import jobs, system
from storage.artifacts import ArtifactStoreError, open_store
from storage.queue import make_celery
from storage.settings import Settings, get_settings


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="erq", version="0.1.0",
                  description="Quantization-as-a-service for Vision Transformers (ERQ). "
                              "Every /v1 route needs `Authorization: Bearer KEY`.")
    app.state.settings = settings
    app.state.celery = make_celery(settings)
    app.state.artifact_store = open_store(settings)
    app.state.auth_throttle = FailedAuthThrottle()
    app.add_middleware(BodySizeLimit)
    app.include_router(jobs.router)
    app.include_router(system.router)

    @app.exception_handler(OperationalError)
    async def database_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
        return JSONResponse({"detail": "the database is unreachable; retry later"}, status_code=503,
                            headers={"Retry-After": "10"})

    @app.exception_handler(IntegrityError)
    async def conflicting_write(request: Request, exc: IntegrityError) -> JSONResponse:
        return JSONResponse({"detail": "the request conflicted with a concurrent change and was not stored; "
                                       "send it again"}, status_code=409)

    @app.exception_handler(ArtifactStoreError)
    async def artifact_store_unavailable(request: Request, exc: ArtifactStoreError) -> JSONResponse:
        return JSONResponse({"detail": "the artifact store is unreachable; retry later"}, status_code=503,
                            headers={"Retry-After": "10"})

    return app
