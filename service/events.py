"""Server-Sent Events for jobs: one shared poller per API process fans out to every follower.

Each tick (POLL_SECONDS) the hub reads the followed jobs' rows in ONE query, whatever the number of
jobs and followers, and reads each job's log file once from the smallest offset any of its
followers still needs. Each follower then gets what it has not seen: a `status` event when the
status changes, a `progress` event when the stage or progress changes, one `log` event per new log
line. After a job's terminal status event its followers' streams end.

Event ids are `ATTEMPT:OFFSET`: the run whose log is being sent, and the byte offset of the log
sent so far. A client that reconnects with `Last-Event-ID` gets the current status again and the
log from where it stopped (from the start if the job has moved on to another run).

A stream also ends, before its job does, with a final `closed` event (`{reason, detail}`):
- `shutdown`: the API process is stopping (SIGTERM or Ctrl-C; `end_streams`, called from the
  signal handler, so that no follower holds a deploy until its job ends);
- `key_revoked`: the key that opened the stream was revoked (re-checked every KEY_CHECK_SECONDS).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

import anyio
from sqlalchemy import select

from storage.artifacts import ArtifactStore
from storage.artifacts.logs import log_run, read_log
from storage.db import session_factory
from storage.models import TERMINAL_STATUSES, ApiKey, Job
from storage.settings import Settings

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
KEY_CHECK_SECONDS = 5.0  # a stream whose key was revoked ends within this long (plus a poll)
OUTAGE_REMINDER_SECONDS = 60.0
MAX_QUEUED_EVENTS = 10_000  # a follower this far behind is dropped (it reconnects with Last-Event-ID)
log = logging.getLogger("erq")


@dataclass(frozen=True)
class Snapshot:
    status: str
    stage: Optional[str]
    progress: float
    error: Optional[str]
    error_code: Optional[str]
    attempts: int
    run: int  # the attempt whose log is followed (the published one once the job ended); 0: none yet
    log_run: Optional[str]  # that attempt's run, the log is read from (None: the job's own folder, before attempts)


class Outage:
    """The log of failed polls: the first failure with its traceback, then a line every
    OUTAGE_REMINDER_SECONDS while it lasts and one when it ends (not a traceback per poll, twice a
    second, for as long as the database is away)."""

    def __init__(self) -> None:
        self.since: Optional[float] = None
        self.reminded = 0.0
        self.polls = 0

    def failed(self) -> None:
        now = time.monotonic()
        self.polls += 1
        if self.since is None:
            self.since = self.reminded = now
            log.warning("event stream poll failed; retrying every %.1f s", POLL_SECONDS, exc_info=True)
        elif now - self.reminded >= OUTAGE_REMINDER_SECONDS:
            self.reminded = now
            log.warning("event stream polls still failing after %.0f s (%d polls)", now - self.since, self.polls)

    def ended(self) -> None:
        if self.since is not None:
            log.warning("event stream polls recovered after %.1f s (%d failed)", time.monotonic() - self.since,
                        self.polls)
            self.since, self.polls = None, 0


@dataclass(eq=False)
class Follower:
    job_id: str
    run: Optional[int]  # from Last-Event-ID: whose log `offset` counts in
    offset: int
    key_id: Optional[int] = None  # the API key that opened the stream: it ends when that key is revoked
    owner_id: Optional[int] = None  # whose stream it is (ERQ_MAX_EVENT_STREAMS_PER_OWNER)
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(MAX_QUEUED_EVENTS))
    sent: Optional[Snapshot] = None
    partial: bytes = b""  # bytes of a line not finished yet
    done: bool = False

    def put(self, item: Optional[str]) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.done = True  # too slow: drop it; it may resume with Last-Event-ID

    def close(self, reason: str, detail: str) -> None:
        """End the stream before the job's end with a final `closed` event (its id resumes the log)."""
        if self.done:
            return
        self.done = True
        event_id = f"{self.run}:{self.offset}" if self.run is not None else ""
        self.put(sse("closed", event_id, {"reason": reason, "detail": detail}))
        self.put(None)


def parse_last_event_id(value: Optional[str]) -> tuple[Optional[int], int]:
    """'3:1042' -> (3, 1042); anything else -> (None, 0): start afresh."""
    try:
        run, offset = (value or "").split(":", 1)
        return int(run), max(0, int(offset))
    except ValueError:
        return None, 0


def sse(event: str, event_id: str, data: dict) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class EventHub:
    """The process's one poller. Lives in the app's event loop; started on the first follower."""

    def __init__(self, settings: Settings, store: ArtifactStore):
        self.settings, self.store = settings, store  # the app's store
        self.followers: dict[str, set[Follower]] = {}
        self.task: Optional[asyncio.Task] = None
        self.ticks = 0  # polls done (one database query each): for tests and the bench
        self.loop = asyncio.get_running_loop()  # made in the app's event loop (routes/jobs.py, event_hub)
        self.stopping = False
        self.keys_checked = time.monotonic()

    def follow(self, job_id: str, last_event_id: Optional[str], key_id: Optional[int] = None,
               owner_id: Optional[int] = None) -> Follower:
        run, offset = parse_last_event_id(last_event_id)
        follower = Follower(job_id, run, offset, key_id, owner_id)
        if self.stopping:  # a request that arrived just before the shutdown
            follower.close(*SHUTDOWN)
            return follower
        self.followers.setdefault(job_id, set()).add(follower)
        if self.task is None or self.task.done():
            self.task = self.loop.create_task(self._run(), name="erq-event-hub")
        return follower

    def open_streams(self, owner_id: int) -> int:
        """The owner's streams open in this process (a stream counts until its client has gone)."""
        return sum(1 for group in self.followers.values() for f in group if f.owner_id == owner_id)

    def shut_down(self) -> None:
        """End every stream now with a final `closed` event: the process is stopping."""
        self.stopping = True
        for followers in list(self.followers.values()):
            for follower in list(followers):
                follower.close(*SHUTDOWN)

    def unfollow(self, follower: Follower) -> None:
        followers = self.followers.get(follower.job_id)
        if followers is not None:
            followers.discard(follower)
            if not followers:
                del self.followers[follower.job_id]

    async def _run(self) -> None:
        outage = Outage()
        while self.followers:
            try:
                await self.tick()
            except Exception:  # a database blip: the followers wait for the next tick
                outage.failed()
            else:
                outage.ended()
            await asyncio.sleep(POLL_SECONDS)

    async def tick(self) -> None:
        job_ids = list(self.followers)
        snapshots = await anyio.to_thread.run_sync(self._read_jobs, job_ids)
        self.ticks += 1
        if time.monotonic() - self.keys_checked >= KEY_CHECK_SECONDS:
            await self._end_streams_of_revoked_keys()
        for job_id in job_ids:
            followers = [f for f in self.followers.get(job_id, ()) if not f.done]
            snapshot = snapshots.get(job_id)
            if snapshot is None:  # deleted meanwhile
                for follower in followers:
                    follower.done = True
                    follower.put(None)
                continue
            if followers:
                await self._publish(job_id, snapshot, followers)

    async def _end_streams_of_revoked_keys(self) -> None:
        followers = [f for group in self.followers.values() for f in group if f.key_id is not None and not f.done]
        revoked = await anyio.to_thread.run_sync(self._revoked, {f.key_id for f in followers})
        self.keys_checked = time.monotonic()
        for follower in followers:
            if follower.key_id in revoked:
                follower.close("key_revoked", "the API key that opened this stream was revoked")

    def _revoked(self, key_ids: set[int]) -> set[int]:
        if not key_ids:
            return set()
        with session_factory(self.settings.database_url, self.settings.database_pool)() as session:
            return set(session.scalars(select(ApiKey.id).where(ApiKey.id.in_(key_ids), ApiKey.revoked_at.is_not(None))))

    def _read_log(self, job_id: str, run: Optional[str], offset: int) -> bytes:
        return read_log(self.store, job_id, run, offset)[0]

    def _read_jobs(self, job_ids: list[str]) -> dict[str, Snapshot]:
        with session_factory(self.settings.database_url, self.settings.database_pool)() as session:
            rows = session.execute(select(Job.id, Job.status, Job.stage, Job.progress, Job.error, Job.error_code,
                                          Job.attempts, Job.published_run).where(Job.id.in_(job_ids))).all()
        snapshots = {}
        for job_id, status, stage, progress, error, error_code, attempts, published_run in rows:
            snapshots[job_id] = Snapshot(str(status), stage, progress, error, error_code, attempts, attempts,
                                         log_run(published_run, attempts))
        return snapshots

    async def _publish(self, job_id: str, snapshot: Snapshot, followers: list[Follower]) -> None:
        terminal = snapshot.status in TERMINAL_STATUSES
        for follower in followers:
            if follower.run != snapshot.run:  # a new run: its log starts at 0
                follower.run, follower.offset, follower.partial = snapshot.run, 0, b""
        start = min(f.offset + len(f.partial) for f in followers)
        data = await anyio.to_thread.run_sync(self._read_log, job_id, snapshot.log_run, start)
        for follower in followers:
            self._send(follower, snapshot, data[follower.offset + len(follower.partial) - start:], terminal)

    def _send(self, follower: Follower, snapshot: Snapshot, new: bytes, terminal: bool) -> None:
        event_id = lambda: f"{snapshot.run}:{follower.offset}"  # noqa: E731
        previous = follower.sent
        if previous is None or previous.status != snapshot.status:
            if not terminal:
                follower.put(sse("status", event_id(), _status_data(snapshot)))
        if previous is None or (previous.stage, previous.progress) != (snapshot.stage, snapshot.progress):
            follower.put(sse("progress", event_id(), {"status": snapshot.status, "stage": snapshot.stage,
                                                      "progress": snapshot.progress}))
        follower.sent = snapshot
        pending = follower.partial + new
        lines = pending.split(b"\n")
        follower.partial = lines.pop()  # after the last newline: not a whole line yet
        if terminal and follower.partial:
            lines.append(follower.partial)
            follower.partial = b""
        for line in lines:
            follower.offset += len(line) + 1
            follower.put(sse("log", event_id(), {"line": line.decode(errors="replace")}))
        if terminal:  # the log is complete: the status event is the last
            follower.put(sse("status", event_id(), _status_data(snapshot)))
            follower.done = True
            follower.put(None)


SHUTDOWN = ("shutdown", "the API is shutting down; reconnect with Last-Event-ID to go on where this stream stopped")


def end_streams(hub: Optional[EventHub]) -> None:
    """From a signal handler (or any thread): end the hub's streams in its own event loop."""
    if hub is not None:
        hub.loop.call_soon_threadsafe(hub.shut_down)


def _status_data(snapshot: Snapshot) -> dict:
    return {"status": snapshot.status, "stage": snapshot.stage, "progress": snapshot.progress,
            "error": snapshot.error, "error_code": snapshot.error_code, "attempts": snapshot.attempts}


async def stream(hub: EventHub, follower: Follower) -> AsyncIterator[str]:
    """The text/event-stream of one follower, with keep-alive comments while nothing happens."""
    try:
        yield f"retry: {int(POLL_SECONDS * 4000)}\n\n"
        while True:
            try:
                item = await asyncio.wait_for(follower.queue.get(), KEEPALIVE_SECONDS)
            except asyncio.TimeoutError:
                if follower.done:
                    return
                yield ": keep-alive\n\n"
                continue
            if item is None:
                return
            yield item
    finally:
        hub.unfollow(follower)
