"""The figures of GET /metrics. Job counts and run times come from two aggregate queries (a few rows
back, whatever the number of jobs), read at most once per ERQ_METRICS_CACHE_SECONDS by one scrape
while concurrent scrapes wait for its figures in the event loop (no thread, no connection held)."""
from __future__ import annotations

import asyncio
import math
import secrets
import time
from dataclasses import dataclass
from typing import Optional

import anyio
from fastapi import Request, status
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from service.auth import refuse_credentials
from service.problems import Problem
from storage import jobs
from storage.db import session_factory
from storage.models import JobStatus
from storage.settings import Settings

DURATION_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 7200, 21600)


@dataclass(frozen=True)
class JobFigures:
    counts: dict[str, int]
    durations: jobs.DurationHistogram


class JobFiguresCache:
    """This API process's latest job figures, and when they were read."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.figures: Optional[JobFigures] = None
        self.read_at = -math.inf
        self.reads = 0  # database reads so far: for tests
        self.lock: Optional[asyncio.Lock] = None  # made in the event loop, on first use

    async def get(self) -> JobFigures:
        self.lock = self.lock or asyncio.Lock()
        async with self.lock:
            if self.figures is None or time.monotonic() - self.read_at >= self.settings.metrics_cache_seconds:
                self.figures = await anyio.to_thread.run_sync(self._read)
                self.read_at = time.monotonic()
                self.reads += 1
            return self.figures

    def _read(self) -> JobFigures:
        with session_factory(self.settings.database_url, self.settings.database_pool)() as session:
            return JobFigures(jobs.counts_by_status(session), jobs.duration_histogram(session, DURATION_BUCKETS))


def check_access(request: Request, settings: Settings) -> None:
    """ERQ_METRICS=off: 404. ERQ_METRICS_TOKEN set: the scraper sends it as a bearer token (failures
    count towards the address's failed authentications, as for API keys)."""
    if settings.metrics == "off":
        raise Problem(status.HTTP_404_NOT_FOUND, "not_found", "metrics are turned off on this service (ERQ_METRICS)")
    if settings.metrics_token is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    expected = settings.metrics_token.get_secret_value()
    if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), expected.encode()):
        return
    refuse_credentials(request, "invalid_metrics_token",
                       "GET /metrics needs 'Authorization: Bearer TOKEN' with the token of ERQ_METRICS_TOKEN")


class JobCollector:
    """Job figures (every API process reports the same)."""

    def __init__(self, figures: JobFigures):
        self.figures = figures

    def collect(self):
        counts, durations = self.figures.counts, self.figures.durations
        by_status = GaugeMetricFamily("erq_jobs", "Jobs by status", labels=["status"])
        for name in JobStatus:
            by_status.add_metric([name.value], counts.get(name, 0))
        yield by_status
        yield GaugeMetricFamily("erq_queue_depth", "Jobs waiting for a worker", value=counts.get(JobStatus.QUEUED, 0))
        buckets = [(str(bound), count) for bound, count in durations.buckets] + [("+Inf", durations.count)]
        yield HistogramMetricFamily("erq_job_duration_seconds", "Run time of succeeded jobs",
                                    buckets=buckets, sum_value=durations.total_seconds)


class EventStreamCollector:
    """This API process's event streams: followers now, and database polls so far (one per tick,
    whatever the number of followers)."""

    def __init__(self, hub):
        self.hub = hub

    def collect(self):
        followers = sum(len(f) for f in self.hub.followers.values()) if self.hub else 0
        yield GaugeMetricFamily("erq_event_stream_followers", "Clients following job events in this process",
                                value=followers)
        yield CounterMetricFamily("erq_event_stream_polls", "Database polls of the event streams in this process",
                                  value=self.hub.ticks if self.hub else 0)
