"""Deleting one owner's data (`erq admin delete-owner-data OWNER`): its ended jobs with their files,
and its uploads with their archives. A queued or running job is asked to cancel instead, and the
uploads it names stay until it has ended: run the command again then. The owner and its keys stay
(`erq admin revoke-key` ends its access)."""
from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select

from storage import jobs, uploads
from storage.artifacts import open_store
from storage.db import session_scope
from storage.models import Job
from storage.settings import Settings
from storage.upload_store import open_upload_store


@dataclass
class Deleted:
    jobs: int = 0
    uploads: int = 0
    cancelling: list[str] = field(default_factory=list)  # active jobs asked to cancel
    uploads_in_use: list[str] = field(default_factory=list)


def delete_owner_data(settings: Settings, owner_id: int) -> Deleted:
    deleted, store = Deleted(), open_store(settings)
    with session_scope(settings.database_url) as session:
        owned = list(session.scalars(select(Job).where(Job.owner_id == owner_id)))
        for job in owned:
            if job.status in jobs.TERMINAL:
                continue
            jobs.request_cancel(session, job.id)
            session.refresh(job)
            if job.status not in jobs.TERMINAL:  # running: it stops at its next progress step; queued ends now
                deleted.cancelling.append(job.id)
    for job_id in [job.id for job in owned if job.id not in deleted.cancelling]:
        with session_scope(settings.database_url) as session:  # one job at a time: files first, then the rows
            job = session.get(Job, job_id)
            if job is None or job.status not in jobs.TERMINAL:
                continue
            store.remove_job(job.id)
            jobs.delete_job(session, job)
            deleted.jobs += 1
    deleted.uploads, deleted.uploads_in_use = uploads.delete_owner_uploads(settings.database_url,
                                                                           open_upload_store(settings), owner_id)
    return deleted
