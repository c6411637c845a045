"""Bearer-token authentication against hashed API keys."""
from __future__ import annotations

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from storage.db import session_scope
from storage.keys import find_key

_bearer = HTTPBearer(auto_error=False)


def current_key_id(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> int:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing API key: send 'Authorization: Bearer KEY'",
                            headers={"WWW-Authenticate": "Bearer"})
    with session_scope(request.app.state.settings.database_url) as session:
        key = find_key(session, credentials.credentials)
        if key is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked API key",
                                headers={"WWW-Authenticate": "Bearer"})
        return key.id
