"""Webhook delivery, a worker's duty (the sweeper's webhook duty, worker/sweeper.py); what the API
needs too (events, URL policy, secrets, signature) is in storage/webhooks.py. Each sweep:

1. announces: for each job with a webhook whose status changed since the last sweep, writes an
   outbox row (`webhook_deliveries`) when the new status is one of the job's events;
2. claims the rows that are due, each with a lease (a token on the row, for the attempt's deadline
   plus LEASE_MARGIN_SECONDS): only the attempt holding the lease records its outcome, and a row is
   not due again before its lease ends, so one row has at most one attempt in flight;
3. sends them from its own threads (SENDERS, at most SENDERS_PER_OWNER of them for one owner, and
   never more claimed than there are free threads), so that a slow receiver delays neither the
   sweeper's other duties nor another owner's deliveries, let alone a worker or the API;
4. records each attempt on its row (status code, error, attempts): delivered on a 2xx, else retried
   with exponential backoff until ERQ_WEBHOOK_RETRY_SECONDS after the event, then given up. Whatever
   goes wrong in an attempt (a refused connection, a host name that cannot be encoded, a bug) ends it
   with the reason recorded.

Requests: `Erq-Signature` (storage/webhooks.py), `Erq-Event`, `Erq-Delivery` (the row id: receivers
deduplicate on it). Only hosts matching ERQ_WEBHOOK_ALLOWED_HOSTS are contacted (checked at submission and again at each attempt);
redirects are not followed (a 3xx is a failed attempt), each attempt has one deadline for connecting,
sending and reading the answer together (ERQ_WEBHOOK_TIMEOUT_SECONDS: a watchdog cuts the connection
then, however slowly the receiver trickles), and at most RESPONSE_CAP bytes of the answer are read.
"""
from __future__ import annotations

import http.client
import json
import logging
import secrets
import socket
import ssl
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from storage.db import session_scope
from storage.models import Job, Owner, WebhookDelivery, db_now, utcnow
from storage.settings import Settings
from storage.webhooks import DEFAULT_EVENTS, allowed_host_patterns, host_allowed, signature

RESPONSE_CAP = 64 * 1024
MAX_BACKOFF_SECONDS = 300
SENDERS = 16  # attempts in flight at once, per sweeper
SENDERS_PER_OWNER = 2  # of which at most this many for one owner's deliveries
LEASE_MARGIN_SECONDS = 30  # a claim's lease outlasts the attempt's deadline by this much (to record it)
START_WINDOW_SECONDS = 10  # an attempt not started this soon after its claim is left to its lease's end
USER_AGENT = "erq-webhooks/1"
log = logging.getLogger("erq.webhooks")


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
    owner_id: int
    event: str
    url: str
    body: bytes
    secret: Optional[str]
    lease: str  # the token on the row while this attempt holds it
    number: int  # 1 for the first attempt of the delivery


def claim_due(session: Session, hold_seconds: float, slots: Callable[[int], int], limit: int = SENDERS) -> list[Attempt]:
    """At most `limit` deliveries due now, at most `slots(owner)` of each owner's, each claimed with a
    lease of `hold_seconds` (a conditional update: concurrent sweepers never claim one row twice) and
    counted as an attempt. Owners take turns: every owner's oldest due row comes before any second one."""
    rank = func.row_number().over(partition_by=Job.owner_id,
                                  order_by=(WebhookDelivery.next_attempt_at, WebhookDelivery.id)).label("rank")
    ranked = (select(WebhookDelivery.id, WebhookDelivery.next_attempt_at, WebhookDelivery.attempts,
                     WebhookDelivery.job_id, Job.owner_id, WebhookDelivery.event, WebhookDelivery.url,
                     WebhookDelivery.body, Owner.webhook_secret, rank)
              .join(Job, Job.id == WebhookDelivery.job_id).join(Owner, Owner.id == Job.owner_id)
              .where(WebhookDelivery.next_attempt_at <= db_now()).subquery())
    # Owners whose senders are all busy take SENDERS_PER_OWNER rows each at most, and at most SENDERS
    # owners are busy: this many rows always hold enough for every free sender.
    due = session.execute(select(ranked).where(ranked.c.rank <= SENDERS_PER_OWNER)
                          .order_by(ranked.c.rank, ranked.c.next_attempt_at)
                          .limit(SENDERS * SENDERS_PER_OWNER + limit)).all()
    claimed: list[Attempt] = []
    taken: Counter[int] = Counter()
    for delivery_id, seen, attempts, job_id, owner_id, event, url, body, secret, _ in due:
        if len(claimed) >= limit:
            break
        if taken[owner_id] >= slots(owner_id):
            continue
        lease = secrets.token_hex(16)
        won = session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id == delivery_id, WebhookDelivery.next_attempt_at == seen)
            .values(next_attempt_at=db_now(hold_seconds), attempts=WebhookDelivery.attempts + 1, lease=lease,
                    last_attempt_at=db_now())).rowcount
        if won:
            taken[owner_id] += 1
            claimed.append(Attempt(delivery_id, job_id, owner_id, event, url, body.encode(), secret, lease,
                                   attempts + 1))
    return claimed


class Watchdog:
    """Cuts a connection at its deadline, whatever it is doing. http.client's time-out applies to each
    socket operation, so a receiver that sends a byte every few seconds would hold a sender forever."""

    def __init__(self, connection: http.client.HTTPConnection, seconds: float):
        self.connection = connection
        self.expired = threading.Event()
        self.timer = threading.Timer(seconds, self.cut)
        self.timer.daemon = True

    def cut(self) -> None:
        self.expired.set()
        sock = self.connection.sock  # None while connecting: the connect time-out ends that
        if sock is not None:
            try:  # the plain socket's shutdown, also under TLS: a blocked read returns at once
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "Watchdog":
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()


def post(attempt: Attempt, settings: Settings) -> tuple[Optional[int], Optional[str]]:
    """One signed POST: (status code, error). Never raises: whatever goes wrong is the attempt's error."""
    try:
        return _post(attempt, settings)
    except Exception as exc:
        if not isinstance(exc, (OSError, http.client.HTTPException)):
            log.warning("webhook %s of job %s: the attempt failed", attempt.event, attempt.job_id, exc_info=True)
        return None, f"{type(exc).__name__}: {exc}"[:500]


def _post(attempt: Attempt, settings: Settings) -> tuple[Optional[int], Optional[str]]:
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
    try:
        with Watchdog(connection, timeout) as watchdog:
            try:
                connection.connect()
                if watchdog.expired.is_set():
                    raise TimeoutError("connected after the deadline")
                connection.request("POST", path, body=attempt.body, headers=headers)
                response = connection.getresponse()
                if watchdog.expired.is_set():  # the headers may have been cut short
                    raise TimeoutError("answered after the deadline")
            except (OSError, http.client.HTTPException) as exc:  # TimeoutError is an OSError
                if watchdog.expired.is_set() or isinstance(exc, TimeoutError):
                    return None, (f"timed out: no complete answer within ERQ_WEBHOOK_TIMEOUT_SECONDS={timeout:g} "
                                  "(connecting, sending and reading the answer together)")
                raise
            received = 0  # the status is known: the body is read only up to the cap or the deadline
            try:
                while received < RESPONSE_CAP and (chunk := response.read1(RESPONSE_CAP - received)):
                    received += len(chunk)
            except (OSError, http.client.HTTPException):
                pass
        if 300 <= response.status < 400:
            return response.status, f"redirects are not followed (Location: {response.getheader('Location')})"
        return response.status, None if 200 <= response.status < 300 else f"answered {response.status}"
    finally:
        connection.close()


def record(session: Session, attempt: Attempt, status_code: Optional[int], error: Optional[str],
           settings: Settings) -> bool:
    """Record the attempt's outcome on its row, if the attempt still holds the row's lease; returns
    whether it did (not when the job was deleted, or the lease ran out and another attempt took over)."""
    holds = WebhookDelivery.id == attempt.delivery_id, WebhookDelivery.lease == attempt.lease
    created_at = session.scalar(select(WebhookDelivery.created_at).where(*holds))
    if created_at is None:
        return False
    outcome: dict[str, Any] = {"status_code": status_code, "last_error": error, "lease": None}
    given_up = False
    if error is None:
        outcome.update(delivered_at=db_now(), next_attempt_at=None)
    else:
        backoff = min(MAX_BACKOFF_SECONDS, 2 ** (attempt.number - 1))
        given_up = (utcnow() - created_at).total_seconds() + backoff > settings.webhook_retry_seconds
        outcome.update({"given_up_at": db_now(), "next_attempt_at": None} if given_up
                       else {"next_attempt_at": db_now(backoff)})
    if not session.execute(update(WebhookDelivery).where(*holds).values(**outcome)).rowcount:
        return False
    if given_up:
        log.warning("webhook %s of job %s given up after %d attempts: %s", attempt.event, attempt.job_id,
                    attempt.number, error)
    return True


class WebhookDuty:
    """The sweeper's webhook duty: announce, claim what is due (as many as there are free senders,
    SENDERS_PER_OWNER per owner at most), send from its threads, record."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.pool = ThreadPoolExecutor(SENDERS, thread_name_prefix="erq-webhook")
        self.lock = threading.Lock()
        self.in_flight: Counter[int] = Counter()  # attempts being sent, per owner

    def free_senders(self, owner_id: int) -> int:
        with self.lock:
            return SENDERS_PER_OWNER - self.in_flight[owner_id]

    def __call__(self) -> int:
        with session_scope(self.settings.database_url) as session:
            announce(session)
        with self.lock:
            free = SENDERS - sum(self.in_flight.values())
        if free <= 0:
            return 0
        start_by = time.monotonic() + START_WINDOW_SECONDS  # taken before the claim: on the safe side
        hold = self.settings.webhook_timeout_seconds + LEASE_MARGIN_SECONDS
        with session_scope(self.settings.database_url) as session:
            attempts = claim_due(session, hold, self.free_senders, limit=free)
        for attempt in attempts:
            with self.lock:
                self.in_flight[attempt.owner_id] += 1
            self.pool.submit(self._send, attempt, start_by)
        return len(attempts)

    def _send(self, attempt: Attempt, start_by: float) -> None:
        try:
            if time.monotonic() > start_by:  # this process stalled: the row is sent again after its lease
                log.warning("webhook %s of job %s: not sent, claimed too long ago", attempt.event, attempt.job_id)
                return
            status_code, error = post(attempt, self.settings)
            self._record(attempt, status_code, error)
        finally:
            with self.lock:
                self.in_flight[attempt.owner_id] -= 1
                if not self.in_flight[attempt.owner_id]:
                    del self.in_flight[attempt.owner_id]

    def _record(self, attempt: Attempt, status_code: Optional[int], error: Optional[str]) -> None:
        for delay in (0.5, 2, 5, 10):  # a database blip must not lose the outcome of an attempt
            try:
                with session_scope(self.settings.database_url) as session:
                    if not record(session, attempt, status_code, error, self.settings):
                        log.info("webhook %s of job %s: outcome dropped, the row is no longer this attempt's",
                                 attempt.event, attempt.job_id)
                return
            except Exception:
                log.warning("webhook %s of job %s: outcome not recorded yet", attempt.event, attempt.job_id,
                            exc_info=True)
                time.sleep(delay)
        log.error("webhook %s of job %s: the outcome of attempt %d was not recorded; the delivery is tried again "
                  "when its lease ends", attempt.event, attempt.job_id, attempt.number)

    def drain(self) -> None:
        """Wait for the attempts in flight (tests, shutdown)."""
        self.pool.shutdown(wait=True)
        self.pool = ThreadPoolExecutor(SENDERS, thread_name_prefix="erq-webhook")
