"""`erq worker`: Celery workers that run one job at a time each, and the sweeper.

`--concurrency 1` (the default) is one worker process: Celery's solo pool runs the job in the
process itself (no daemonic pool child), so the engine's data loaders can start their own worker
processes, and killing the worker kills its job with it. `--concurrency N` starts N such
processes, one per slot, under a small supervisor: slot i sees only GPU i (CUDA_VISIBLE_DEVICES),
is kept running by a worker.keeper.Keeper (as `erq serve`'s embedded worker is), and is stopped
warm (its job handed back) when the supervisor is stopped. The supervisor runs the sweeper; a
single worker runs it itself.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Optional

from storage.settings import Settings, get_settings
from worker.keeper import EXIT_CONFIGURATION, Keeper, stop_all

SLOT_VARIABLE = "ERQ_WORKER_SLOT"  # set by the supervisor for its slot processes
# A slot's warm shutdown (its job stops at the next progress step and goes back to the queue) may take
# this long before it is killed; docker-compose.yml's stop_grace_period is longer.
SLOT_STOP_SECONDS = 90
HEALTH_STALE_SECONDS = 30
# At start a worker checks that it can write to the artifact store, trying again for this long: in
# docker-compose the S3 service may come up after the worker. (Module constants: tests shorten them.)
ARTIFACT_STORE_WAIT_SECONDS = 30.0
ARTIFACT_STORE_RETRY_SECONDS = 5.0
log = logging.getLogger("erq")


class WorkerConfigurationError(Exception):
    """The worker cannot run as configured; the message says what to change."""


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="erq worker", description="Run Celery workers for ERQ jobs.")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="jobs at once: one process per slot, slot i on GPU i (default 1)")
    parser.add_argument("--queues", default=None, help="comma-separated queues (default: ERQ_QUEUE)")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--healthcheck", action="store_true",
                        help="exit 0 if this machine's worker swept within the last "
                             f"{HEALTH_STALE_SECONDS} s (ERQ_WORKER_HEALTH_FILE), else 1")
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.healthcheck:
        return check_health(settings)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    from storage.migrate import upgrade
    from storage.queue import declare_queue
    from storage.settings import LocalFolderError, prepare_local_folders

    try:
        prepare_local_folders(settings)
    except LocalFolderError as exc:
        print(f"erq worker: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIGURATION
    upgrade(settings.database_url)
    declare_queue(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        wait_for_artifact_store(settings)
        if args.concurrency > 1:
            return Supervisor(args, settings).run()
        return run_worker(args, settings, sweep=SLOT_VARIABLE not in os.environ)
    except WorkerConfigurationError as exc:
        print(f"erq worker: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIGURATION


def check_health(settings: Settings) -> int:
    path = settings.worker_health_file
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        print(f"unhealthy: {path} does not exist (no worker has swept yet)", file=sys.stderr)
        return 1
    if age > HEALTH_STALE_SECONDS:
        print(f"unhealthy: the worker's last sweep was {age:.0f} s ago ({path})", file=sys.stderr)
        return 1
    print(f"healthy: last sweep {age:.0f} s ago")
    return 0


def wait_for_artifact_store(settings: Settings) -> None:
    """Return once this worker can write to the artifact store, or raise WorkerConfigurationError after
    ARTIFACT_STORE_WAIT_SECONDS: a store it cannot write to would fail every job after its compute."""
    from storage.artifacts import ArtifactStoreError, open_store

    store = open_store(settings)
    where = settings.artifact_url or settings.artifact_dir
    deadline = time.monotonic() + ARTIFACT_STORE_WAIT_SECONDS
    while True:
        try:
            store.check(write=True)
            return
        except ArtifactStoreError as exc:
            if time.monotonic() + ARTIFACT_STORE_RETRY_SECONDS > deadline:
                raise WorkerConfigurationError(f"the artifact store {where} is not usable: {exc}") from exc
            log.warning("erq worker: the artifact store %s is not usable yet (%s); trying again in %g s",
                        where, exc, ARTIFACT_STORE_RETRY_SECONDS)
            time.sleep(ARTIFACT_STORE_RETRY_SECONDS)


def resolve_device(requested: str) -> str:
    """'cuda' or 'cpu' for ERQ_DEVICE auto / cuda / cpu; imports torch (once, at start)."""
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise WorkerConfigurationError(
            "ERQ_DEVICE=cuda but no CUDA GPU is visible to this process (torch.cuda.is_available() is False, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')!s}); check the NVIDIA "
            "driver and the container's GPU reservation, or set ERQ_DEVICE=cpu or auto to run jobs on the CPU")
    return "cpu"


def run_worker(args: argparse.Namespace, settings: Settings, sweep: bool) -> int:
    """One worker process: the engine loaded now, jobs run one at a time in this process."""
    device = resolve_device(settings.device)
    import erq_core.runner  # noqa: F401  the engine (torch, timm) loads now, not in the first job
    import torch

    from worker.tasks import app, engine

    engine.device = device
    slot = os.environ.get(SLOT_VARIABLE)
    log.info("erq worker ready: torch %s on %s%s%s, artifacts in %s", torch.__version__, device,
             f" (slot {slot}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')})" if slot else "",
             f", {settings.loader_workers} data-loader processes per job" if settings.loader_workers is not None
             else "", settings.artifact_url or settings.artifact_dir)
    sweeper = _start_sweeper(app, settings) if sweep else None
    try:
        app.worker_main(["worker", "--pool=solo", "--concurrency=1", f"--queues={args.queues or settings.queue}",
                         f"--loglevel={args.loglevel}", "--without-gossip", "--without-mingle", "--without-heartbeat"])
    finally:
        if sweeper is not None:
            sweeper.stop()
    return 0


def _start_sweeper(app, settings: Settings):
    from worker.sweeper import Sweeper, standard_duties

    from worker.upload_cache import sweeper_duties

    sweeper = Sweeper(standard_duties(app, settings) + sweeper_duties(settings), settings.worker_health_file)
    sweeper.start()
    return sweeper


def gpu_ids(settings: Settings, slots: int) -> list[Optional[str]]:
    """The GPU each slot sees (None: the CPU), or WorkerConfigurationError."""
    if settings.device == "cpu":
        return [None] * slots
    import torch  # only counts GPUs here; the slots load the engine themselves

    count = torch.cuda.device_count()
    if count == 0:
        resolve_device(settings.device)  # raises for ERQ_DEVICE=cuda
        return [None] * slots
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [i.strip() for i in visible.split(",")] if visible else [str(i) for i in range(count)]
    if slots > count:
        raise WorkerConfigurationError(f"--concurrency {slots} but only {count} GPU(s) visible: one job per GPU, "
                                       f"so at most --concurrency {count}")
    return ids[:slots]


class Supervisor:
    """N slot processes (`erq worker` with ERQ_WORKER_SLOT=i), each on its own GPU, each kept by a Keeper."""

    def __init__(self, args: argparse.Namespace, settings: Settings):
        self.args, self.settings = args, settings
        self.stopping = threading.Event()
        self.exit_code = 0

    def command(self) -> list[str]:
        return [sys.executable, "-m", "erq_cli", "worker", "--queues", self.args.queues or self.settings.queue,
                "--loglevel", self.args.loglevel]

    def environment(self, slot: int, gpu: Optional[str]) -> dict[str, str]:
        env = {**os.environ, SLOT_VARIABLE: str(slot)}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        return env

    def run(self) -> int:
        gpus = gpu_ids(self.settings, self.args.concurrency)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        from storage.queue import make_celery

        sweeper = _start_sweeper(make_celery(self.settings), self.settings)
        log.info("erq worker: %d slots on %s", len(gpus),
                 ", ".join(f"GPU {gpu}" if gpu is not None else "CPU" for gpu in gpus))
        keepers = [Keeper(f"erq worker slot {slot}", self.command(), self.environment(slot, gpu), SLOT_STOP_SECONDS,
                          on_misconfigured=self.misconfigured) for slot, gpu in enumerate(gpus)]
        for keeper in keepers:
            keeper.start()
        self.stopping.wait()
        stop_all(keepers)
        sweeper.stop()
        return self.exit_code

    def misconfigured(self, keeper: Keeper) -> None:
        """A slot that cannot start as configured stops them all: the others would fail the same way."""
        self.exit_code = EXIT_CONFIGURATION
        self.stopping.set()
