"""The queue's repairs, duties of every worker's sweeper (worker/sweeper.py): re-queue the jobs whose
worker went silent (lost leases), and send again the messages of queued jobs that no message will
ever start (orphaned jobs)."""
from __future__ import annotations

import logging

from celery import Celery

from storage import jobs
from storage.db import session_scope
from storage.queue import enqueue, ready_messages
from storage.settings import Settings

# A queued job younger than this may still be on its way to the broker (the API commits the job,
# then sends its message): the orphan sweep leaves it alone.
ORPHAN_GRACE_SECONDS = 30
log = logging.getLogger("erq")


def requeue_lost_jobs(app: Celery, settings: Settings) -> list[str]:
    """Re-queue (or fail) running jobs whose worker stopped sending heartbeats (a sweeper duty)."""
    with session_scope(settings.database_url) as session:
        requeued = jobs.expire_leases(session, settings.lease_seconds, settings.max_attempts)
    for job_id in requeued:
        log.warning("job %s lost its worker; re-queued", job_id)
        try:
            enqueue(app, job_id)
        except Exception as exc:  # the job stays queued: the orphan sweep sends it once the broker is back
            log.warning("job %s re-queued, but its message could not be sent yet (%s)", job_id, exc)
    return requeued


class OrphanedJobs:
    """Finds queued jobs that no broker message will ever start, and sends their message again.

    A job stays `queued` with no message behind it when the API dies between committing the job and
    sending its message, or when Redis restarts without persistence. Each sweep (`reannounce`, run by
    every worker's sweeper) reads the number of messages waiting in the queue, then the number of jobs
    queued for more than ORPHAN_GRACE_SECONDS: fewer messages than jobs means some messages are gone.
    Which ones cannot be told, so every such job is sent again; the extra messages are harmless,
    since `jobs.claim` is atomic: a message for a job that is already running or ended does nothing.

    Races, and why they do no harm:
    - A job the API has committed but not sent yet is younger than the grace: not counted.
    - A message a worker has taken whose claim is not committed yet, or a job a lease sweep has
      re-queued but not sent yet: the job counts and its message does not, for milliseconds. So a
      shortfall is acted on only when two sweeps in a row (a few seconds apart) see one.
    - Messages are counted before jobs: a job claimed in between lowers the job count, never
      raises it.
    - Messages of younger jobs count too, so a loss shows only once they have run or aged past
      the grace: recovery can be late, a job never runs twice.
    - Several workers may find the same shortfall and each send the messages: more duplicates,
      still harmless, and the next sweeps see enough messages.
    A broker that is down skips the sweep (logged); the sweeps after it comes back recover.
    """

    def __init__(self, app: Celery, settings: Settings):
        self.app, self.settings = app, settings
        self.short_last_sweep = False

    def reannounce(self) -> list[str]:
        """One sweep; returns the jobs whose message was sent again."""
        try:
            waiting = ready_messages(self.app, self.settings)
        except Exception as exc:
            self.short_last_sweep = False
            log.warning("orphaned-job sweep skipped: the broker is unreachable (%s)", exc)
            return []
        with session_scope(self.settings.database_url) as session:
            queued = jobs.queued_longer_than(session, ORPHAN_GRACE_SECONDS)
        short = waiting < queued
        confirmed = short and self.short_last_sweep
        self.short_last_sweep = short and not confirmed  # after acting, wait for two short sweeps again
        if not confirmed:
            return []
        with session_scope(self.settings.database_url) as session:
            orphans = jobs.queued_ids_longer_than(session, ORPHAN_GRACE_SECONDS)
        log.warning("%d job(s) queued for over %d s but only %d message(s) in the broker queue: "
                    "sending the messages of all %d again", queued, ORPHAN_GRACE_SECONDS, waiting, len(orphans))
        sent = []
        try:
            for job_id in orphans:
                enqueue(self.app, job_id)
                sent.append(job_id)
        except Exception as exc:  # the others stay queued: a later sweep sends them
            log.warning("re-sending the messages of queued jobs failed after %d of %d: the broker is unreachable "
                        "(%s)", len(sent), len(orphans), exc)
        return sent
