"""Dependencies of the routes: one database session per request, the settings, the queue client,
the artifact store."""
from __future__ import annotations

from typing import Annotated, Iterator

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from storage.artifacts import ArtifactStore
from storage.db import session_factory
from storage.settings import Settings


def db_session(request: Request) -> Iterator[Session]:
    """The request's one session. Routes that write commit it themselves, before they answer;
    whatever is not committed is rolled back when the request ends."""
    session = session_factory(request.app.state.settings.database_url)()
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
