"""API keys: random tokens shown once, stored as sha256 hashes."""
from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Optional

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import ApiKey, utcnow

KEY_PREFIX = "erq_"


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def create_key(session: Session, name: str) -> str:
    """Create (or replace a revoked) key called `name`; return the raw key, which is not stored."""
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    existing = session.scalar(select(ApiKey).where(ApiKey.name == name))
    if existing is not None and existing.revoked_at is None:
        raise ValueError(f"a key named {name!r} already exists; revoke it first")
    if existing is not None:
        existing.key_hash, existing.revoked_at, existing.created_at = hash_key(raw), None, utcnow()
    else:
        session.add(ApiKey(name=name, key_hash=hash_key(raw)))
    session.flush()
    return raw


def revoke_key(session: Session, name: str) -> bool:
    key = session.scalar(select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None)))
    if key is None:
        return False
    key.revoked_at = utcnow()
    return True


def find_key(session: Session, raw: str) -> Optional[ApiKey]:
    """The active key matching `raw`, compared in constant time."""
    digest = hash_key(raw)
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)))
    if key is None or not hmac.compare_digest(key.key_hash, digest):
        return None
    return key


def has_keys(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).limit(1)) is not None
