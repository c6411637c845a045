"""Models, health, readiness and Prometheus metrics."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from erq_core.registry import MODEL_ALIASES
from service.schemas import ModelOut
from storage import jobs
from storage.db import ping, session_scope
from storage.models import JOB_STATUSES

router = APIRouter()
DURATION_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 7200, 21600)


@router.get("/v1/models", response_model=list[ModelOut], tags=["models"])
def list_models() -> list[ModelOut]:
    return [ModelOut(alias=e.alias, timm_name=e.timm_name) for e in MODEL_ALIASES.values()]


@router.get("/healthz", tags=["health"])
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
def readyz(request: Request, response: Response) -> dict:
    settings = request.app.state.settings
    checks = {}
    try:
        ping(settings.database_url)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        with request.app.state.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        response.headers["Retry-After"] = "10"
    return {"status": "ready" if ready else "not ready", **checks}


class JobCollector:
    """Reads job figures from the database at each scrape (every API process reports the same)."""

    def __init__(self, database_url: str):
        self.database_url = database_url

    def collect(self):
        with session_scope(self.database_url) as session:
            counts = jobs.counts_by_status(session)
            durations = jobs.finished_durations(session)
        by_status = GaugeMetricFamily("erq_jobs", "Jobs by status", labels=["status"])
        for name in JOB_STATUSES:
            by_status.add_metric([name], counts.get(name, 0))
        yield by_status
        yield GaugeMetricFamily("erq_queue_depth", "Jobs waiting for a worker", value=counts.get("queued", 0))
        buckets = [(str(b), sum(d <= b for d in durations)) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", len(durations)))
        yield HistogramMetricFamily("erq_job_duration_seconds", "Run time of succeeded jobs",
                                    buckets=buckets, sum_value=sum(durations))


@router.get("/metrics", tags=["health"])
def metrics(request: Request) -> Response:
    registry = CollectorRegistry()
    registry.register(JobCollector(request.app.state.settings.database_url))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
