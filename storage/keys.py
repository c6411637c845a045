"""Owners and their API keys: random tokens shown once, stored as sha256 hashes plus a 12-character
prefix in clear (to tell keys apart in listings). A revoked key stays revoked: a new key is always
a new row with a new token."""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Optional

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import ApiKey, Owner, utcnow

KEY_PREFIX = "erq_"
PREFIX_LENGTH = 12


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    id: int
    owner: str
    prefix: str
    raw: str  # the key itself: shown once, never stored


def owner_named(session: Session, name: str) -> Optional[Owner]:
    return session.scalar(select(Owner).where(Owner.name == name))


def create_key(session: Session, owner_name: str) -> NewKey:
    """Add a key for `owner_name`, creating the owner on first use."""
    if not owner_name or len(owner_name) > 100 or not owner_name.isprintable():
        raise ValueError("an owner name is 1 to 100 printable characters")
    owner = owner_named(session, owner_name)
    if owner is None:
        owner = Owner(name=owner_name)
        session.add(owner)
        session.flush()
    while True:
        raw = KEY_PREFIX + secrets.token_urlsafe(32)
        if session.scalar(select(ApiKey.id).where(ApiKey.prefix == raw[:PREFIX_LENGTH])) is None:
            break  # 48 random bits: a clash is rare, but prefixes must name one key
    key = ApiKey(owner_id=owner.id, prefix=raw[:PREFIX_LENGTH], key_hash=hash_key(raw))
    session.add(key)
    session.flush()
    return NewKey(id=key.id, owner=owner.name, prefix=key.prefix, raw=raw)


def find_key_to_revoke(session: Session, id_or_prefix: str) -> Optional[ApiKey]:
    """The key whose id or 12-character prefix is `id_or_prefix`."""
    if id_or_prefix.isdigit():
        return session.get(ApiKey, int(id_or_prefix))
    if len(id_or_prefix) == PREFIX_LENGTH:
        return session.scalar(select(ApiKey).where(ApiKey.prefix == id_or_prefix))
    return None


def revoke_key(session: Session, key: ApiKey) -> None:
    if key.revoked_at is None:
        key.revoked_at = utcnow()


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).join(ApiKey.owner).order_by(Owner.name, ApiKey.id)))


def find_key(session: Session, raw: str) -> Optional[ApiKey]:
    """The active key matching `raw`, compared in constant time."""
    digest = hash_key(raw)
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)))
    if key is None or not hmac.compare_digest(key.key_hash, digest):
        return None
    return key


def has_keys(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).limit(1)) is not None
