"""Secrets kept in the database sealed under the server key (ERQ_SECRET_KEY): webhook signing
secrets are stored as `sealed:` + a Fernet token (AES-128-CBC + HMAC-SHA256, `cryptography`),
so a copy of the database alone does not give them away.

The key: ERQ_SECRET_KEY (comma-separated to rotate: the first seals, each opens), else the file
HOME/secret-key, which the first process that seals something writes (0600) when it is missing.
"""
from __future__ import annotations

from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from storage.private_files import SECRET_KEY_FILE, private_file, write_private_file
from storage.settings import Settings

SEALED_PREFIX = "sealed:"


class SealingError(ValueError):
    """A secret cannot be sealed or opened here; the message says which key setting to fix."""


def key_file(settings: Settings) -> Path:
    return settings.home / SECRET_KEY_FILE


def is_sealed(value: str) -> bool:
    return value.startswith(SEALED_PREFIX)


def seal(clear: str, settings: Settings) -> str:
    """`clear` sealed under the server key (made into HOME/secret-key when there is none)."""
    return SEALED_PREFIX + _keys(settings, create=True).encrypt(clear.encode()).decode()


def unseal(value: str, settings: Settings) -> str:
    """The clear secret `value` seals. Raises SealingError (no key here, another key, not sealed)."""
    if not is_sealed(value):
        raise SealingError("the secret is stored in clear: run `erq migrate` to seal it")
    try:
        return _keys(settings, create=False).decrypt(value[len(SEALED_PREFIX):].encode()).decode()
    except InvalidToken:
        raise SealingError("the secret was sealed under another server key: set the same ERQ_SECRET_KEY (or "
                           f"{key_file(settings)}) on every host, or make a new one with erq admin webhook-secret"
                           ) from None


def new_key() -> str:
    return Fernet.generate_key().decode()


def _keys(settings: Settings, create: bool) -> MultiFernet:
    raw = settings.secret_key or _key_from_file(settings, create)
    try:
        return MultiFernet([Fernet(part.strip()) for part in raw.split(",") if part.strip()])
    except ValueError as exc:
        raise SealingError(f"ERQ_SECRET_KEY is not a Fernet key (32 random bytes, URL-safe base64; make one with "
                           f"`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key())'`): "
                           f"{exc}") from None


def _key_from_file(settings: Settings, create: bool) -> str:
    path = key_file(settings)
    if not path.exists():
        if not create:
            raise SealingError(f"no server key to open secrets with: ERQ_SECRET_KEY is unset and {path} does not "
                               "exist (set ERQ_SECRET_KEY to the key that sealed them)")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private_file(path, new_key() + "\n")  # another process may win the race: both use its key
    private_file(path)
    return path.read_text().strip()
