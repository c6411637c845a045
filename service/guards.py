"""Protections in front of the routes: request size, slowing down key guessing, and each owner's
request rate."""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict, deque
from typing import Optional

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 64 * 1024


class BodySizeLimit:
    """Refuse request bodies over MAX_BODY_BYTES with 413, whether they declare a Content-Length or
    arrive chunked. The body (at most the limit) is read here and handed on to the app."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES, exempt: tuple[str, ...] = ()):
        self.app, self.limit, self.exempt = app, limit, exempt  # exempt: paths that stream (and bound) their body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(send, self.limit)
        messages: list[Message] = []
        received = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away: the app sees the disconnect
            received += len(message.get("body", b""))
            if received > self.limit:
                return await _too_large(send, self.limit)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    from service.problems import PROBLEM_MEDIA_TYPE, problem_body

    body = json.dumps(problem_body(413, "body_too_large", f"request body over {limit // 1024} KiB")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class FailedAuthThrottle:
    """Counts failed authentications per client address in a sliding window. Memory is bounded:
    at most `max_clients` addresses are remembered (the least recently failing are forgotten
    first), each with at most `max_failures` times."""

    def __init__(self, max_failures: int = 10, window_seconds: float = 60.0, max_clients: int = 10_000):
        self.max_failures, self.window, self.max_clients = max_failures, window_seconds, max_clients
        self.failures: OrderedDict[str, deque[float]] = OrderedDict()
        self.lock = threading.Lock()  # routes run in a thread pool

    def failed(self, client: str) -> bool:
        """Record a failure; True when the client has failed too often in the window."""
        now = time.monotonic()
        with self.lock:
            times = self.failures.pop(client, None) or deque(maxlen=self.max_failures + 1)
            while times and times[0] < now - self.window:
                times.popleft()
            times.append(now)
            self.failures[client] = times  # most recent last
            while len(self.failures) > self.max_clients:
                self.failures.popitem(last=False)
            return len(times) > self.max_failures


class OwnerRequestRate:
    """A token bucket per owner: `rate` requests a second, in bursts of up to `burst`, in this API
    process. Memory is bounded: at most `max_owners` buckets (the least recently used go first; a
    forgotten owner starts again with a full bucket)."""

    def __init__(self, rate: float, burst: int, max_owners: int = 100_000):
        self.rate, self.burst, self.max_owners = rate, burst, max_owners
        self.buckets: OrderedDict[int, tuple[float, float]] = OrderedDict()  # owner -> (tokens, when)
        self.lock = threading.Lock()  # routes run in a thread pool

    def take(self, owner_id: int) -> Optional[float]:
        """Spend one request of the owner's; None when allowed, else the seconds until one is."""
        if self.rate <= 0:
            return None
        now = time.monotonic()
        with self.lock:
            tokens, then = self.buckets.pop(owner_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            wait = None if tokens >= 1 else (1 - tokens) / self.rate
            self.buckets[owner_id] = (tokens - 1 if wait is None else tokens, now)
            while len(self.buckets) > self.max_owners:
                self.buckets.popitem(last=False)
            return wait
