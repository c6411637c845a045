"""Bearer-token authentication: the caller is the owner of a valid, unrevoked API key."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Optional

from fastapi import Depends, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.deps import DbSession
from service.problems import Problem
from storage.keys import find_key

bearer = HTTPBearer(auto_error=False)


@dataclass(frozen=True)
class Caller:
    owner_id: int
    key_id: int


def key_owner(session: Session, credentials: Optional[HTTPAuthorizationCredentials]) -> Optional[Caller]:
    """The caller a bearer key belongs to; None without one, or for an unknown or revoked key."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        return None
    key = find_key(session, credentials.credentials)
    caller = Caller(owner_id=key.owner_id, key_id=key.id) if key is not None else None
    # End the read now (the ids are read before: a rollback expires the key): the connection goes back
    # to the pool before the route waits for a worker thread. Held across that wait, a burst of
    # requests (event streams reconnecting together) held every connection while every thread waited
    # for one.
    session.rollback()
    return caller


def current_caller(request: Request, session: DbSession,
                   credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Caller:
    """The key is checked first: a valid key is never throttled. Failed attempts are counted per
    client address, and past the limit that address's failures answer 429 instead of 401."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Problem(status.HTTP_401_UNAUTHORIZED, "missing_api_key",
                      "missing API key: send 'Authorization: Bearer KEY'", headers={"WWW-Authenticate": "Bearer"})
    caller = key_owner(session, credentials)
    if caller is not None:
        _check_request_rate(request, caller)
        return caller
    refuse_credentials(request, "invalid_api_key", "invalid or revoked API key")


def refuse_credentials(request: Request, code: str, message: str) -> None:
    """A failed authentication: counted for the client's address, 429 past its limit, else 401 `code`."""
    throttle = request.app.state.auth_throttle
    if throttle.failed(request.client.host if request.client else "unknown"):
        raise Problem(status.HTTP_429_TOO_MANY_REQUESTS, "too_many_failed_authentications",
                      "too many failed authentications from this address; wait a minute",
                      headers={"Retry-After": str(int(throttle.window))})
    raise Problem(status.HTTP_401_UNAUTHORIZED, code, message, headers={"WWW-Authenticate": "Bearer"})


CurrentCaller = Annotated[Caller, Depends(current_caller)]


def _check_request_rate(request: Request, caller: Caller) -> None:
    """One owner's clients together get ERQ_OWNER_REQUESTS_PER_SECOND (in bursts of
    ERQ_OWNER_REQUEST_BURST) from this API process; past it, 429 with when to come back."""
    wait = request.app.state.owner_request_rate.take(caller.owner_id)
    if wait is not None:
        rate = request.app.state.owner_request_rate.rate
        raise Problem(status.HTTP_429_TOO_MANY_REQUESTS, "too_many_requests",
                      f"this key's owner sent more than {rate:g} requests a second (ERQ_OWNER_REQUESTS_PER_SECOND); "
                      "slow down and retry after Retry-After seconds", headers={"Retry-After": str(math.ceil(wait))},
                      limit=rate)
