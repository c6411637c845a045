"""Models, health, readiness and Prometheus metrics."""
from __future__ import annotations

import logging
from typing import Optional

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from erq_core.registry import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, MODEL_ALIASES, supported_timm_names
from service import problems
from service.auth import CurrentCaller, bearer, key_owner
from service.deps import AppSettings, Artifacts, DbSession
from service.metrics import EventStreamCollector, JobCollector, JobFiguresCache, check_access
from service.schemas import ModelOut
from storage.artifacts import ArtifactStore, ArtifactStoreError
from storage.db import ping
from storage.settings import Settings
from storage.uploads import PREFIXES

UPLOAD_PREFIX = PREFIXES["model"][0]

log = logging.getLogger("erq.api")
router = APIRouter()


@router.get("/v1/models", response_model=list[ModelOut], tags=["models"],
            responses=problems.responses(401, 429, 500, 503))
def list_models(caller: CurrentCaller, settings: AppSettings) -> list[ModelOut]:
    """Every value of a job's `model` this service knows, and whether ERQ_ALLOWED_MODELS accepts it:
    the aliases, the supported timm names, and the hf-hub: and local-dir: forms."""
    return accepted_models(settings)


def accepted_models(settings: Settings) -> list[ModelOut]:
    aliases = frozenset(MODEL_ALIASES)
    allowed = lambda spec: settings.model_allowed(spec, aliases)  # noqa: E731
    patterns = settings.allowed_model_patterns
    models = [ModelOut(alias=e.alias, timm_name=e.timm_name, kind="alias", allowed=allowed(e.alias))
              for e in MODEL_ALIASES.values()]
    models += [ModelOut(alias=name, timm_name=name, kind="timm", allowed=allowed(name))
               for name in sorted(supported_timm_names())]
    for prefix, kind, form, where in ((HF_HUB_PREFIX, "hf-hub", "hf-hub:ORG/NAME", "a Hugging Face Hub repository"),
                                      (LOCAL_DIR_PREFIX, "local-dir", "local-dir:/path",
                                       "a timm folder (config.json, model.safetensors) under ERQ_DATA_ROOTS"),
                                      (UPLOAD_PREFIX, "upload", "upload:ID",
                                       "a model this owner uploaded (POST /v1/models; GET /v1/models/uploads)")):
        enabled = [p for p in patterns if p.startswith(prefix)]
        note = f"{where}; accepted: {', '.join(enabled)}" if enabled else f"{where}; not enabled (ERQ_ALLOWED_MODELS)"
        models.append(ModelOut(alias=form, timm_name=None, kind=kind, allowed=bool(enabled), note=note))
    return models


@router.get("/healthz", tags=["health"], responses=problems.responses(500))
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], responses={
    503: {"description": "the database or the broker is unreachable, or the artifact store cannot be read "
                         "(the body says which; why the store cannot be read is shown to a caller with a "
                         "valid API key, and logged)"}, **problems.responses(500)})
def readyz(request: Request, response: Response, settings: AppSettings, store: Artifacts, session: DbSession,
           credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> dict:
    """Unauthenticated, for load balancers and orchestrators: the reason a store cannot be read
    names buckets, endpoints or folders, so only callers with a valid key see it."""
    checks = {}
    try:
        ping(settings.database_url, settings.database_pool)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        with request.app.state.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    problem = artifact_store_problem(store)
    log_change(request, "artifact_store", problem)
    if problem is None:
        checks["artifact_store"] = "ok"
    else:
        shown = checks["database"] == "ok" and key_owner(session, credentials) is not None
        checks["artifact_store"] = f"unavailable: {problem}" if shown else \
            "unavailable (an API key shows why; the API's log says it too)"
    ready = all(v == "ok" for v in checks.values())
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        response.headers["Retry-After"] = "10"
    return {"status": "ready" if ready else "not ready", **checks}


def artifact_store_problem(store: ArtifactStore) -> Optional[str]:
    """Why the API cannot read the store, or None. Read access only: the API reads logs and serves
    downloads; workers check that they can write."""
    try:
        store.check(write=False)
    except ArtifactStoreError as exc:
        return str(exc)
    return None


def log_change(request: Request, check: str, problem: Optional[str]) -> None:
    """Log a failing check when its reason changes (and its recovery), not at every probe."""
    logged = request.app.state.__dict__.setdefault("readiness_problems", {})
    if logged.get(check) != problem:
        if problem is None:
            log.warning("ready again: %s", check)
        else:
            log.warning("not ready: %s: %s", check, problem)
        logged[check] = problem


@router.get("/metrics", tags=["health"], responses={
    200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}},
    **problems.responses(401, 404, 429, 500, 503)})
async def metrics(request: Request) -> Response:
    """Prometheus figures. ERQ_METRICS=off turns the route off (404); with ERQ_METRICS_TOKEN set,
    scrapers send `Authorization: Bearer TOKEN`."""
    settings = request.app.state.settings
    check_access(request, settings)
    registry = CollectorRegistry()
    registry.register(JobCollector(await job_figures(request.app).get()))
    registry.register(EventStreamCollector(getattr(request.app.state, "event_hub", None)))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def job_figures(app) -> JobFiguresCache:
    if getattr(app.state, "job_figures", None) is None:
        app.state.job_figures = JobFiguresCache(app.state.settings)
    return app.state.job_figures
