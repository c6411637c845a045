"""`erq worker`: a Celery worker that runs one job at a time, plus a sweeper for lost and orphaned jobs."""
from __future__ import annotations

import argparse
import logging
import threading

from storage.settings import get_settings
from worker.celery_app import LEASE_SWEEP_SECONDS, OrphanedJobs, requeue_lost_jobs


def _sweeper(stop: threading.Event) -> None:
    from worker.tasks import app

    settings = get_settings()
    orphans = OrphanedJobs(app, settings)
    while not stop.wait(LEASE_SWEEP_SECONDS):
        try:
            requeue_lost_jobs(app, settings)
            orphans.reannounce()
        except Exception:
            logging.getLogger("erq").warning("lease sweep failed", exc_info=True)


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="erq worker", description="Run a Celery worker for ERQ jobs.")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs at once (1 per GPU; default 1)")
    parser.add_argument("--queues", default=None, help="comma-separated queues (default: ERQ_QUEUE)")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    settings = get_settings()
    from storage.migrate import upgrade
    from storage.settings import prepare_local_folders
    from worker.tasks import app

    prepare_local_folders(settings)
    upgrade(settings.database_url)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    threading.Thread(target=_sweeper, args=(stop,), daemon=True, name="lease-sweeper").start()
    try:
        # solo pool (the default, one job per worker): the job runs in this process, so killing the
        # worker kills the job with it. Run one worker per GPU (CUDA_VISIBLE_DEVICES).
        pool = "solo" if args.concurrency == 1 else "prefork"
        app.worker_main(["worker", f"--pool={pool}", f"--concurrency={args.concurrency}",
                         f"--queues={args.queues or settings.queue}", f"--loglevel={args.loglevel}",
                         "--without-gossip", "--without-mingle", "--without-heartbeat"])
    finally:
        stop.set()
    return 0
