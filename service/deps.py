"""Dependencies of the routes: one database session per request, the settings, the queue client,
the artifact store."""
from __future__ import annotations

from typing import Annotated, AsyncIterator

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from storage.artifacts import ArtifactStore
from storage.db import session_factory
from storage.settings import Settings


async def db_session(request: Request) -> AsyncIterator[Session]:
    """The request's one session. Routes that write commit it themselves, before they answer;
    whatever is not committed is rolled back when the request ends.

    Async on purpose: it is closed in the event loop (a rollback, sub-millisecond), not after
    waiting for a worker thread. A connection held while waiting for a thread lets a burst of
    requests hold every pooled connection while every thread waits for one (a deadlock that ends
    in pool time-outs)."""
    settings = request.app.state.settings
    session = session_factory(settings.database_url, settings.database_pool)()
    try:
        yield session
    finally:
        session.close()


def settings(request: Request) -> Settings:
    return request.app.state.settings


def queue(request: Request) -> Celery:
    return request.app.state.celery


def artifact_store(request: Request) -> ArtifactStore:
    return request.app.state.artifact_store


DbSession = Annotated[Session, Depends(db_session)]
AppSettings = Annotated[Settings, Depends(settings)]
Queue = Annotated[Celery, Depends(queue)]
Artifacts = Annotated[ArtifactStore, Depends(artifact_store)]
