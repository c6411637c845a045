"""Webhooks, the part the API needs too: a job's `{"url", "events"}` gets a signed POST of the job's
JSON when one of its events happens. Here: the events, the URL policy (checked at submission and
again at each attempt: only hosts matching ERQ_WEBHOOK_ALLOWED_HOSTS), the owners' signing secrets
and the signature, and a delivery as the API shows it. Sending is the workers' duty
(worker/webhook_delivery.py); nothing here runs in a request or in a job.

Signature: `Erq-Signature: t=<unix>,v1=<hex HMAC-SHA256(owner's secret, "<t>.<body>")>`.
"""
from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import Owner, WebhookDelivery
from storage.settings import Settings

EVENTS = ("running", "succeeded", "failed", "cancelled")
DEFAULT_EVENTS = ("succeeded", "failed", "cancelled")
MAX_HOST_NAME = 253


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
    if not host_name_valid(parts.hostname):
        raise WebhookRefused(f"webhook.url host {parts.hostname[:80]!r} is not a valid host name: each dot-separated "
                             f"label is 1 to 63 characters, the whole name at most {MAX_HOST_NAME}",
                             "invalid_webhook_url")
    if not host_allowed(url, patterns):
        raise WebhookRefused(f"webhook.url host {parts.hostname!r} is not allowed here (ERQ_WEBHOOK_ALLOWED_HOSTS="
                             f"{settings.webhook_allowed_hosts!r})", "webhook_host_not_allowed")
    if not owner.webhook_secret:
        raise WebhookRefused(f"owner {owner.name!r} has no webhook secret: an administrator runs "
                             f"`erq admin webhook-secret {owner.name}` and hands it over", "webhook_secret_missing")


def host_name_valid(host: str) -> bool:
    """Whether the host can be looked up at all (what connecting encodes it with: IDNA)."""
    try:
        return len(host.encode("idna").rstrip(b".")) <= MAX_HOST_NAME
    except UnicodeError:  # an empty label, or one over 63 characters
        return False


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


def delivery_document(delivery: WebhookDelivery) -> dict[str, Any]:
    iso = lambda moment: moment.isoformat() if moment else None  # noqa: E731
    state = "delivered" if delivery.delivered_at else "given_up" if delivery.given_up_at else "pending"
    return {"id": delivery.id, "event": delivery.event, "state": state, "attempts": delivery.attempts,
            "status_code": delivery.status_code, "error": delivery.last_error,
            "created_at": iso(delivery.created_at), "last_attempt_at": iso(delivery.last_attempt_at), "delivered_at": iso(delivery.delivered_at),
            "given_up_at": iso(delivery.given_up_at)}

