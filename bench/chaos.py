"""The chaos drill of bench/load.py --chaos: jobs submitted, followed, cancelled and posted to a
webhook receiver while a driver kills, at random moments, workers (SIGKILL and SIGTERM), the API
(SIGKILL), Redis (shut down without saving: its queue is gone) and PostgreSQL (restarted), each a
few times, restarting each as its supervisor would.

PostgreSQL and Redis are instances of this drill's own (a cluster made with initdb, a redis-server,
on free ports), restarted the way the machine's would be (pg_ctl restart -m fast, as pg_ctlcluster
does; redis-cli shutdown nosave), so the drill disturbs no other user of the machine's servers.

What it reports: accepted, completed, failed (with reasons), lost (accepted jobs that never ended:
must be 0), 5xx answers other than the documented 503 (must be 0), the webhook events at the
receiver after deduplication on Erq-Delivery (each expected event exactly once: missing and
duplicated events must be 0; repeated requests of one delivery are at-least-once redeliveries that
the receiver drops), and the followed jobs whose event stream ended with the terminal event.
"""
from __future__ import annotations

import asyncio
import glob
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.service.webhook_receiver import Receiver, verify

TERMINAL = {"succeeded", "failed", "cancelled"}
FAULT_GAP_SECONDS = (5, 60)  # between two faults: the ten of two rounds spread over about five minutes
FAULTS = ("worker-sigkill", "worker-sigterm", "api-sigkill", "redis-restart", "postgres-restart")
SUBMIT_ATTEMPTS = 15  # with back-off up to 8 s: a client keeps trying for about 90 s
WEBHOOK_SETTLE_SECONDS = 300  # after the last job ended: deliveries retried after an outage arrive by then
FOLLOWERS_SETTLE_SECONDS = 60
SIGNATURE_TOLERANCE_SECONDS = 300  # what docs/api.md tells receivers to accept


class PrivatePostgres:
    """A PostgreSQL cluster of this drill's own, on a free port, that it may restart at will."""

    def __init__(self, port: int):
        self.bin = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
        self.folder = Path(tempfile.mkdtemp(prefix="erq-chaos-pg-"))
        os.chmod(self.folder, 0o755)
        self.data, self.log, self.port = self.folder / "data", self.folder / "postgres.log", port
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.folder, "postgres")
        subprocess.run([*self.as_postgres, f"{self.bin}/initdb", "-D", str(self.data), "-A", "trust", "-U",
                        "postgres"], check=True, capture_output=True)
        self._ctl("start")

    def _ctl(self, *action: str) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
        subprocess.run([*self.as_postgres, f"{self.bin}/pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w",
                        "-o", options, *action], check=True, capture_output=True)

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        subprocess.run([*self.as_postgres, f"{self.bin}/pg_ctl", "-D", str(self.data), "stop", "-m", "immediate"],
                       capture_output=True)
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Tally:
    answered: int = 0
    accepted: list[str] = field(default_factory=list)
    hooked: set[str] = field(default_factory=set)  # accepted jobs with a webhook
    http_5xx: Counter = field(default_factory=Counter)  # status -> count, 503 apart
    http_503: int = 0
    transport_errors: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    post_retries: int = 0
    cancels_requested: int = 0
    cancels_accepted: int = 0
    faults: list[dict] = field(default_factory=list)
    followed: dict[str, str] = field(default_factory=dict)  # job -> "terminal" / "cut"
    streams_opened: int = 0
    streams_resumed: int = 0
    ended: set[str] = field(default_factory=set)

    def answer(self, status: int) -> None:
        if status == 503:
            self.http_503 += 1
        elif status >= 500:
            self.http_5xx[status] += 1


class Chaos:
    def __init__(self, service, jobs: int, clients: int, followers: int, rounds: int, seed: int, job: dict):
        self.service, self.jobs, self.clients, self.followers, self.rounds = service, jobs, clients, followers, rounds
        self.random = random.Random(seed)
        self.job = job
        self.tally = Tally()
        self.receiver = Receiver()
        self.submitted_all = asyncio.Event()
        self.all_ended = asyncio.Event()
        self.secret = ""

    # -- the faults --------------------------------------------------------------------------------
    def _restart_worker(self, index: int, sig: int) -> None:
        process = self.service.processes[index]
        process.send_signal(sig)
        try:
            process.wait(150)  # SIGTERM: a warm shutdown hands the job back first
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        time.sleep(1.0)
        self.service.processes[index] = self.service._start(["worker"], f"worker{index - 1}-restart{len(self.tally.faults)}",
                                                            self.service.worker_cpus, OMP_NUM_THREADS="1")

    def _restart_redis(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.service.redis_port), "shutdown", "nosave"], capture_output=True)
        self.service.redis.wait()
        time.sleep(1.0)
        self.service.start_redis()

    def fault(self, name: str) -> None:
        workers = range(1, len(self.service.processes))
        if name == "worker-sigkill":
            self._restart_worker(self.random.choice(workers), signal.SIGKILL)
        elif name == "worker-sigterm":
            self._restart_worker(self.random.choice(workers), signal.SIGTERM)
        elif name == "api-sigkill":
            self.service.kill_api(1.0)
        elif name == "redis-restart":
            self._restart_redis()
        else:
            self.service.postgres.restart()

    async def driver(self) -> None:
        """Each fault `rounds` times, in a random order, at random moments while the jobs run."""
        plan = [name for name in FAULTS for _ in range(self.rounds)]
        self.random.shuffle(plan)
        while self.tally.answered < self.jobs // 10:
            await asyncio.sleep(0.1)
        start = time.monotonic()
        for name in plan:
            await asyncio.sleep(self.random.uniform(*FAULT_GAP_SECONDS))
            if self.all_ended.is_set():
                break
            began = time.monotonic()
            await asyncio.to_thread(self.fault, name)
            self.tally.faults.append({"fault": name, "at_s": round(began - start, 1),
                                      "took_s": round(time.monotonic() - began, 1),
                                      "jobs_accepted_then": len(self.tally.accepted)})
            print(f"chaos: {name} at {began - start:.0f} s ({len(self.tally.accepted)} accepted)", flush=True)

    # -- the clients -------------------------------------------------------------------------------
    async def _request(self, client: httpx.AsyncClient, method: str, url: str, **kwargs) -> httpx.Response | None:
        """One request, tried again after a transport error or a 503 (with back-off); None if it never got
        an answer other than those."""
        for attempt in range(SUBMIT_ATTEMPTS):
            if attempt:
                await asyncio.sleep(min(8.0, 0.25 * 2 ** attempt))
            try:
                answer = await client.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                self.tally.transport_errors[type(exc).__name__] += 1
                continue
            self.tally.answer(answer.status_code)
            if answer.status_code != 503:
                return answer
        return None

    async def submit_all(self, client: httpx.AsyncClient) -> None:
        run = secrets.token_hex(4)
        pending = list(range(self.jobs))

        async def one_client() -> None:
            while pending:
                i = pending.pop()
                body = dict(self.job)
                if i % 3 == 0:
                    body["webhook"] = {"url": f"{self.receiver.url}/hooks"}
                answer = await self._request(client, "POST", "/v1/jobs", json=body,
                                             headers={"Idempotency-Key": f"chaos-{run}-{i}"})
                self.tally.answered += 1
                if answer is not None and answer.status_code == 202:
                    job_id = answer.json()["id"]
                    self.tally.accepted.append(job_id)
                    if "webhook" in body:
                        self.tally.hooked.add(job_id)
                    if self.random.random() < 0.1:
                        asyncio.create_task(self.cancel_later(client, job_id))
                else:
                    self.tally.rejected["no answer" if answer is None else str(answer.status_code)] += 1

        await asyncio.gather(*(one_client() for _ in range(self.clients)))
        self.submitted_all.set()

    async def cancel_later(self, client: httpx.AsyncClient, job_id: str) -> None:
        await asyncio.sleep(self.random.uniform(0, 20))
        self.tally.cancels_requested += 1
        answer = await self._request(client, "POST", f"/v1/jobs/{job_id}/cancel")
        self.tally.cancels_accepted += answer is not None and answer.status_code < 300

    async def wait_all(self, client: httpx.AsyncClient, timeout: float) -> dict[str, dict]:
        """Page through the job list until every accepted job has ended and none is queued or running."""
        await self.submitted_all.wait()
        wanted, final, active = set(self.tally.accepted), {}, None
        deadline = time.monotonic() + timeout
        while (len(final) < len(wanted) or active != 0) and time.monotonic() < deadline:
            await asyncio.sleep(2)
            cursor, seen_active = None, 0
            while True:
                answer = await self._request(client, "GET", "/v1/jobs",
                                             params={"limit": 100, **({"cursor": cursor} if cursor else {})})
                if answer is None or answer.status_code != 200:
                    break
                page = answer.json()
                final.update({j["id"]: j for j in page["jobs"] if j["id"] in wanted and j["status"] in TERMINAL})
                seen_active += sum(j["status"] not in TERMINAL for j in page["jobs"])
                cursor = page["next_cursor"]
                if not cursor:
                    active = seen_active
                    break
            self.tally.ended = set(final)
        self.all_ended.set()
        return final

    async def follower(self, client: httpx.AsyncClient) -> None:
        """Follows one job at a time to its terminal event, resuming with Last-Event-ID when the stream is
        cut (API killed, database gone), then another job that has not ended yet."""
        while not self.all_ended.is_set():
            candidates = [j for j in self.tally.accepted if j not in self.tally.followed and j not in self.tally.ended]
            if not candidates:
                if self.submitted_all.is_set():
                    return
                await asyncio.sleep(0.5)
                continue
            job_id = self.random.choice(candidates)
            self.tally.followed[job_id] = "cut"
            if await self.follow(client, job_id):
                self.tally.followed[job_id] = "terminal"

    async def follow(self, client: httpx.AsyncClient, job_id: str) -> bool:
        last_id, deadline = None, None
        while True:
            if self.all_ended.is_set():
                deadline = deadline or time.monotonic() + FOLLOWERS_SETTLE_SECONDS
                if time.monotonic() > deadline:
                    return False
            headers = {"Last-Event-ID": last_id} if last_id else {}
            event, data = None, ""
            try:
                async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as answer:
                    self.tally.answer(answer.status_code)
                    if answer.status_code == 200:
                        self.tally.streams_opened += 1
                        self.tally.streams_resumed += last_id is not None
                        async for line in answer.aiter_lines():
                            if line.startswith("event:"):
                                event = line[6:].strip()
                            elif line.startswith("data:"):
                                data = line[5:].strip()
                            elif line.startswith("id:"):
                                last_id = line[3:].strip()
                            elif not line and event == "status" and json.loads(data).get("status") in TERMINAL:
                                return True
            except httpx.TransportError as exc:
                self.tally.transport_errors[f"stream {type(exc).__name__}"] += 1
            await asyncio.sleep(1.0)

    # -- the receiver's view -------------------------------------------------------------------------
    def webhook_tally(self, final: dict[str, dict]) -> dict:
        expected = {(job_id, final[job_id]["status"]) for job_id in self.tally.hooked if job_id in final}
        deliveries: dict[tuple[str, str], set[str]] = defaultdict(set)
        requests_per_delivery: Counter = Counter()
        bad_signatures = stale_signatures = 0
        for request in list(self.receiver.received):
            body = json.loads(request.body)
            deliveries[(body["id"], request.headers["Erq-Event"])].add(request.headers["Erq-Delivery"])
            requests_per_delivery[request.headers["Erq-Delivery"]] += 1
            # Checked now, long after some arrived: the signature itself, and its timestamp against the
            # moment the request arrived (what a receiver checks on arrival), not against now.
            bad_signatures += not verify(self.secret, request, tolerance=float("inf"))
            arrived = time.time() - (time.monotonic() - request.at)
            signed_at = int(dict(p.split("=", 1) for p in request.headers["Erq-Signature"].split(","))["t"])
            stale_signatures += abs(arrived - signed_at) >= SIGNATURE_TOLERANCE_SECONDS
        return {"webhook_jobs": len(self.tally.hooked), "webhook_events_expected": len(expected),
                "webhook_requests_received": len(self.receiver.received),
                "webhook_redeliveries_dropped_by_dedupe": sum(n - 1 for n in requests_per_delivery.values()),
                "webhook_events_delivered_once_after_dedupe": sum(len(deliveries.get(e, ())) == 1 for e in expected),
                "webhook_events_missing": sum(not deliveries.get(e) for e in expected),
                "webhook_events_duplicated": sum(len(ids) > 1 for ids in deliveries.values()),
                "webhook_events_unexpected": sum(1 for e in deliveries if e not in expected),
                "webhook_bad_signatures": bad_signatures,
                f"webhook_signatures_older_than_{SIGNATURE_TOLERANCE_SECONDS}_s_on_arrival": stale_signatures}

    async def settle_webhooks(self, final: dict[str, dict]) -> dict:
        deadline = time.monotonic() + WEBHOOK_SETTLE_SECONDS
        while self.webhook_tally(final)["webhook_events_missing"] and time.monotonic() < deadline:
            await asyncio.sleep(2)
        return self.webhook_tally(final)

    async def run(self, timeout: float) -> dict:
        self.receiver.__enter__()
        limits = httpx.Limits(max_connections=self.clients + self.followers + 20)
        start = time.monotonic()
        try:
            async with httpx.AsyncClient(base_url=self.service.url, timeout=30, limits=limits,
                                         headers={"Authorization": f"Bearer {self.service.key}"}) as client:
                tasks = [asyncio.create_task(self.driver())]
                tasks += [asyncio.create_task(self.follower(client)) for _ in range(self.followers)]
                submitting = asyncio.create_task(self.submit_all(client))
                final = await self.wait_all(client, timeout)
                await submitting
                await asyncio.gather(*tasks)
                webhooks = await self.settle_webhooks(final)
        finally:
            self.receiver.__exit__(None, None, None)
        statuses = Counter(job["status"] for job in final.values())
        followed = Counter(self.tally.followed.values())
        t = self.tally
        return {
            "submitted": self.jobs, "clients": self.clients, "accepted": len(t.accepted),
            "rejected": dict(t.rejected), "completed": statuses.get("succeeded", 0),
            "cancelled": statuses.get("cancelled", 0), "failed": statuses.get("failed", 0),
            "failure_reasons": dict(Counter((j["error"] or "")[:120] for j in final.values()
                                            if j["status"] == "failed")),
            "lost": len(t.accepted) - len(final), "cancels_requested": t.cancels_requested,
            "cancels_accepted": t.cancels_accepted,
            "http_5xx_other_than_503": dict(t.http_5xx), "http_503_retry_later": t.http_503,
            "transport_errors_retried": dict(t.transport_errors),
            **webhooks,
            "followers": self.followers, "jobs_followed": len(t.followed),
            "followed_jobs_ended_with_terminal_event": followed.get("terminal", 0),
            "followed_jobs_without_terminal_event": followed.get("cut", 0),
            "event_streams_opened": t.streams_opened, "event_streams_resumed_with_last_event_id": t.streams_resumed,
            "faults": t.faults, "fault_counts": dict(Counter(f["fault"] for f in t.faults)),
            "elapsed_seconds": round(time.monotonic() - start, 1),
        }
