"""Bearer-token authentication against hashed API keys."""
from __future__ import annotations

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from storage.db import session_scope
from storage.keys import find_key

_bearer = HTTPBearer(auto_error=False)


def current_key_id(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> int:
    throttle = request.app.state.auth_throttle
    client = request.client.host if request.client else "unknown"
    if throttle.blocked(client):
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, "too many failed authentications; wait a minute",
                            headers={"Retry-After": str(int(throttle.window))})
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing API key: send 'Authorization: Bearer KEY'",
                            headers={"WWW-Authenticate": "Bearer"})
    with session_scope(request.app.state.settings.database_url) as session:
        key = find_key(session, credentials.credentials)
        if key is None:
            throttle.failed(client)
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked API key",
                                headers={"WWW-Authenticate": "Bearer"})
        return key.id
