"""The FastAPI application."""
from __future__ import annotations

from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from service.guards import BodySizeLimit, FailedAuthThrottle
from service.routes import jobs, system
from storage.settings import Settings, get_settings
from worker.celery_app import make_celery


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="erq", version="0.1.0",
                  description="Quantization-as-a-service for Vision Transformers (ERQ). "
                              "Every /v1 route needs `Authorization: Bearer KEY`.")
    app.state.settings = settings
    app.state.celery = make_celery(settings)
    app.state.auth_throttle = FailedAuthThrottle()
    app.add_middleware(BodySizeLimit)
    app.include_router(jobs.router)
    app.include_router(system.router)

    @app.exception_handler(OperationalError)
    async def database_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
        return JSONResponse({"detail": "the database is unreachable; retry later"}, status_code=503,
                            headers={"Retry-After": "10"})

    return app
