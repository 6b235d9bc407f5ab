"""Password hashing (argon2), opaque bearer tokens, and encryption of storage secrets at rest."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pwdlib import PasswordHash

_password_hash = PasswordHash.recommended()

SESSION_PREFIX = "ibps_"
PERSONAL_PREFIX = "ibpt_"
# A login session younger than this may mint a personal token without the password again: the
# user has just typed it. Older sessions and personal tokens must give the current password, so
# a stolen session cannot turn itself into a lasting token.
FRESH_LOGIN_MINUTES = 10


def hash_password(password: str) -> str:
    return _password_hash.hash(password)


def verify_password(password: str, password_hash: str) -> bool:
    return _password_hash.verify(password, password_hash)


# An argon2 hash or check is about 100 ms of CPU: on the event loop it would stall every other
# request, so requests hash in these few threads (argon2 releases the GIL). Few, so a login
# flood queues here instead of taking every core, and no other work waits behind it.
_hashing = ThreadPoolExecutor(
    max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="password-hash"
)


async def hash_password_in_thread(password: str) -> str:
    """hash_password, off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_hashing, hash_password, password)


async def verify_password_in_thread(password: str, password_hash: str) -> bool:
    """verify_password, off the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_hashing, verify_password, password, password_hash)


# A fixed hash to verify against when the email is unknown, so timing does not reveal accounts.
DUMMY_PASSWORD_HASH = hash_password(secrets.token_urlsafe(16))


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class WrongSecretKey(ValueError):
    """The blob was not encrypted with this key (IBP_SECRET_KEY changed or wrong)."""


_WRONG_KEY = "Stored secrets cannot be decrypted: was IBP_SECRET_KEY changed?"


class SecretBox:
    """Encrypts storage secrets with a key derived from IBP_SECRET_KEY (Fernet: AES + HMAC).

    Blobs sealed with one of `previous_keys` (IBP_PREVIOUS_SECRET_KEYS) still open; new ones
    are always sealed with `secret_key`, and `reseal` moves an old blob to it (MultiFernet).
    """

    def __init__(self, secret_key: str, previous_keys: tuple[str, ...] = ()) -> None:
        keys = dict.fromkeys((secret_key, *previous_keys))  # current first, no repeats
        self._fernet = MultiFernet([_fernet(key) for key in keys])

    def encrypt(self, values: dict[str, Any]) -> str:
        return self._fernet.encrypt(json.dumps(values).encode()).decode()

    def decrypt(self, blob: str | None) -> dict[str, Any]:
        if not blob:
            return {}
        try:
            data: dict[str, Any] = json.loads(self._fernet.decrypt(blob.encode()))
        except InvalidToken as exc:
            raise WrongSecretKey(_WRONG_KEY) from exc
        return data

    def reseal(self, blob: str) -> str:
        """The same secrets sealed with the current key (WrongSecretKey if no key opens it)."""
        try:
            return self._fernet.rotate(blob.encode()).decode()
        except InvalidToken as exc:
            raise WrongSecretKey(_WRONG_KEY) from exc


def _fernet(secret_key: str) -> Fernet:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"ibp-storage-secrets", info=b"fernet-v1"
    ).derive(secret_key.encode())
    return Fernet(base64.urlsafe_b64encode(key))


@lru_cache(maxsize=4)
def _box(secret_key: str, previous_keys: tuple[str, ...]) -> SecretBox:
    return SecretBox(secret_key, previous_keys)


def secret_box() -> SecretBox:
    from app.config import get_settings

    settings = get_settings()
    return _box(settings.secret_key, tuple(settings.previous_secret_keys))
