"""Webhooks: a job's `{"url", "events"}` gets a signed POST of the job's JSON when one of its events
happens. Nothing here runs in a request or in a job: the sweeper's webhook duty (storage/sweeper.py)

1. announces: for each job with a webhook whose status changed since the last sweep, writes an
   outbox row (`webhook_deliveries`) when the new status is one of the job's events;
2. sends the rows that are due, from a small thread pool, so that a slow receiver never delays
   the sweeper's other duties, let alone a worker or the API;
3. records each attempt on its row (status code, error, attempts): delivered on a 2xx, else retried
   with exponential backoff until ERQ_WEBHOOK_RETRY_SECONDS after the event, then given up.

Requests: `Erq-Signature: t=<unix>,v1=<hex HMAC-SHA256(owner's secret, "<t>.<body>")>`,
`Erq-Event`, `Erq-Delivery` (the row id: receivers deduplicate on it). Only hosts matching
ERQ_WEBHOOK_ALLOWED_HOSTS are contacted (checked at submission and again at each attempt);
redirects are not followed (a 3xx is a failed attempt), each attempt has a time-out and at most
RESPONSE_CAP bytes of the answer are read.
"""
from __future__ import annotations

import fnmatch
import hashlib
import hmac
import http.client
import json
import logging
import secrets
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.db import session_scope
from storage.models import Job, Owner, WebhookDelivery, db_now, utcnow
from storage.settings import Settings

EVENTS = ("running", "succeeded", "failed", "cancelled")
DEFAULT_EVENTS = ("succeeded", "failed", "cancelled")
RESPONSE_CAP = 64 * 1024
MAX_BACKOFF_SECONDS = 300
SENDERS = 4
USER_AGENT = "erq-webhooks/1"
log = logging.getLogger("erq.webhooks")


class WebhookRefused(ValueError):
    """The webhook cannot be accepted; `code` is stable (README, "Error codes")."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def allowed_host_patterns(settings: Settings) -> list[str]:
    return [p.strip().lower() for p in settings.webhook_allowed_hosts.split(",") if p.strip()]


def host_allowed(url: str, patterns: list[str]) -> bool:
    """Whether the URL's host (or host:port) matches one of the shell patterns."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return bool(host) and any(fnmatch.fnmatchcase(host, p) or fnmatch.fnmatchcase(f"{host}:{port}", p)
                              for p in patterns)


def check_webhook(url: str, owner: Owner, settings: Settings) -> None:
    """Raise WebhookRefused unless `owner` may have this URL called."""
    patterns = allowed_host_patterns(settings)
    if not patterns:
        raise WebhookRefused("webhooks are off on this service (ERQ_WEBHOOK_ALLOWED_HOSTS is empty)",
                             "webhooks_disabled")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  raises for a bad port
    except ValueError:
        raise WebhookRefused(f"webhook.url {url!r} is not a valid URL", "invalid_webhook_url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise WebhookRefused(f"webhook.url {url!r} must be an http:// or https:// URL with a host and no "
                             "credentials", "invalid_webhook_url")
    if not host_allowed(url, patterns):
        raise WebhookRefused(f"webhook.url host {parts.hostname!r} is not allowed here (ERQ_WEBHOOK_ALLOWED_HOSTS="
                             f"{settings.webhook_allowed_hosts!r})", "webhook_host_not_allowed")
    if not owner.webhook_secret:
        raise WebhookRefused(f"owner {owner.name!r} has no webhook secret: an administrator runs "
                             f"`erq admin webhook-secret {owner.name}` and hands it over", "webhook_secret_missing")


def new_secret(session: Session, owner_name: str) -> str:
    """A new signing secret for the owner (replacing any other): returned once, to be shown once."""
    owner = session.scalar(select(Owner).where(Owner.name == owner_name))
    if owner is None:
        raise ValueError(f"no owner {owner_name!r} (erq admin list-keys shows the owners)")
    owner.webhook_secret = "whsec_" + secrets.token_urlsafe(32)
    return owner.webhook_secret


def signature(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def job_document(job: Job) -> dict[str, Any]:
    """The job as the API shows it (without download URLs, which depend on the API's address)."""
    iso = lambda moment: moment.isoformat() if moment else None  # noqa: E731
    return {"id": job.id, "status": str(job.status), "stage": job.stage, "progress": job.progress,
            "params": job.params, "metrics": job.metrics, "metadata": job.job_metadata, "error": job.error,
            "error_code": job.error_code, "attempts": job.attempts, "created_at": iso(job.created_at),
            "started_at": iso(job.started_at), "finished_at": iso(job.finished_at),
            "artifacts": [{"name": a.name, "size": a.size, "sha256": a.sha256} for a in job.artifacts]}


def announce(session: Session, limit: int = 200) -> int:
    """Outbox rows for the jobs whose status changed since the last sweep; returns how many."""
    changed = session.scalars(
        select(Job).where(Job.webhook.is_not(None),
                          (Job.webhook_seen_status.is_(None)) | (Job.webhook_seen_status != Job.status))
        .limit(limit).with_for_update(skip_locked=True))
    written = 0
    for job in changed:
        status = str(job.status)
        job.webhook_seen_status = status
        if not isinstance(job.webhook, dict) or "url" not in job.webhook:
            log.warning("job %s: its webhook %r is not a {url, events} object; nothing is sent", job.id, job.webhook)
            continue
        if status in job.webhook.get("events", DEFAULT_EVENTS):
            session.add(WebhookDelivery(job_id=job.id, event=status, url=job.webhook["url"],
                                        body=json.dumps(job_document(job), separators=(",", ":")),
                                        created_at=db_now(), next_attempt_at=db_now(), attempts=0))
            written += 1
    return written


@dataclass(frozen=True)
class Attempt:
    delivery_id: int
    job_id: str
    event: str
    url: str
    body: bytes
    secret: Optional[str]


def claim_due(session: Session, hold_seconds: float, limit: int = 50) -> list[Attempt]:
    """Deliveries due now, each claimed for `hold_seconds` (a conditional update: concurrent sweepers
    never send one attempt twice) and counted as an attempt."""
    due = session.execute(
        select(WebhookDelivery.id, WebhookDelivery.next_attempt_at, WebhookDelivery.job_id, WebhookDelivery.event,
               WebhookDelivery.url, WebhookDelivery.body, Owner.webhook_secret)
        .join(Job, Job.id == WebhookDelivery.job_id).join(Owner, Owner.id == Job.owner_id)
        .where(WebhookDelivery.next_attempt_at <= db_now()).order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)).all()
    claimed = []
    for delivery_id, seen, job_id, event, url, body, secret in due:
        taken = session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id == delivery_id, WebhookDelivery.next_attempt_at == seen)
            .values(next_attempt_at=db_now(hold_seconds), attempts=WebhookDelivery.attempts + 1)).rowcount
        if taken:
            claimed.append(Attempt(delivery_id, job_id, event, url, body.encode(), secret))
    return claimed


def post(attempt: Attempt, settings: Settings) -> tuple[Optional[int], Optional[str]]:
    """One signed POST: (status code, error). Never follows a redirect; reads at most RESPONSE_CAP."""
    if attempt.secret is None:
        return None, "the owner has no webhook secret any more"
    if not host_allowed(attempt.url, allowed_host_patterns(settings)):
        return None, "the host is no longer allowed by ERQ_WEBHOOK_ALLOWED_HOSTS"
    parts = urlsplit(attempt.url)
    timeout = settings.webhook_timeout_seconds
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    extra = {"context": ssl.create_default_context()} if parts.scheme == "https" else {}
    connection = connection_class(parts.hostname, parts.port, timeout=timeout, **extra)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "Erq-Event": attempt.event,
               "Erq-Delivery": str(attempt.delivery_id),
               "Erq-Signature": signature(attempt.secret, int(time.time()), attempt.body)}
    deadline = time.monotonic() + timeout
    try:
        connection.request("POST", path, body=attempt.body, headers=headers)
        response = connection.getresponse()
        received = 0
        while received < RESPONSE_CAP and time.monotonic() < deadline:  # a capped, timed read of the answer
            chunk = response.read1(RESPONSE_CAP - received)
            if not chunk:
                break
            received += len(chunk)
        if 300 <= response.status < 400:
            return response.status, f"redirects are not followed (Location: {response.getheader('Location')})"
        return response.status, None if 200 <= response.status < 300 else f"answered {response.status}"
    except (OSError, http.client.HTTPException) as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500]
    finally:
        connection.close()


def record(session: Session, attempt: Attempt, status_code: Optional[int], error: Optional[str],
           settings: Settings) -> None:
    delivery = session.get(WebhookDelivery, attempt.delivery_id)
    if delivery is None:  # the job was deleted meanwhile
        return
    delivery.status_code, delivery.last_error = status_code, error
    if error is None:
        delivery.delivered_at, delivery.next_attempt_at = db_now(), None
        return
    age = (utcnow() - delivery.created_at).total_seconds()
    backoff = min(MAX_BACKOFF_SECONDS, 2 ** (delivery.attempts - 1))
    if age + backoff > settings.webhook_retry_seconds:
        delivery.given_up_at, delivery.next_attempt_at = db_now(), None
        log.warning("webhook %s of job %s given up after %d attempts: %s", delivery.event, delivery.job_id,
                    delivery.attempts, error)
    else:
        delivery.next_attempt_at = db_now(backoff)


class WebhookDuty:
    """The sweeper's webhook duty: announce, claim what is due, send from a thread pool, record."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.pool = ThreadPoolExecutor(SENDERS, thread_name_prefix="erq-webhook")

    def __call__(self) -> int:
        with session_scope(self.settings.database_url) as session:
            announce(session)
        hold = self.settings.webhook_timeout_seconds * 2 + 30  # an attempt lost with its sweeper is retried after
        with session_scope(self.settings.database_url) as session:
            attempts = claim_due(session, hold, limit=SENDERS * 4)
        for attempt in attempts:
            self.pool.submit(self._send, attempt)
        return len(attempts)

    def _send(self, attempt: Attempt) -> None:
        status_code, error = post(attempt, self.settings)
        for delay in (0.5, 2, 5, 10):  # a database blip must not lose the outcome of an attempt
            try:
                with session_scope(self.settings.database_url) as session:
                    record(session, attempt, status_code, error, self.settings)
                return
            except Exception:
                log.warning("webhook %s of job %s: outcome not recorded yet", attempt.event, attempt.job_id,
                            exc_info=True)
                time.sleep(delay)

    def drain(self) -> None:
        """Wait for the attempts in flight (tests, shutdown)."""
        self.pool.shutdown(wait=True)
        self.pool = ThreadPoolExecutor(SENDERS, thread_name_prefix="erq-webhook")


def delivery_document(delivery: WebhookDelivery) -> dict[str, Any]:
    iso = lambda moment: moment.isoformat() if moment else None  # noqa: E731
    state = "delivered" if delivery.delivered_at else "given_up" if delivery.given_up_at else "pending"
    return {"id": delivery.id, "event": delivery.event, "state": state, "attempts": delivery.attempts,
            "status_code": delivery.status_code, "error": delivery.last_error,
            "created_at": iso(delivery.created_at), "delivered_at": iso(delivery.delivered_at),
            "given_up_at": iso(delivery.given_up_at)}

