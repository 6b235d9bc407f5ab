"""Opening the storage driver that holds (or will hold) a backup, with operator-facing errors.

The one place storage secrets are decrypted.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import SecretsUndecryptable
from app.models import BackupStorage
from app.security import WrongSecretKey, secret_box
from app.storage.base import BackupStorageDriver
from app.storage.registry import get_driver


def _secrets(storage: BackupStorage) -> dict[str, Any]:
    try:
        return secret_box().decrypt(storage.secrets_encrypted)
    except WrongSecretKey:
        raise SecretsUndecryptable([(storage.id, storage.name)]) from None


def driver_config(storage: BackupStorage) -> dict[str, Any]:
    """The whole config with secrets decrypted: for a storage driver, never for a response.

    Raises SecretsUndecryptable (naming the storage) when IBP_SECRET_KEY does not open them.
    """
    return {**storage.config, **_secrets(storage)}


def secrets_set(storage: BackupStorage) -> list[str]:
    """The names of the secrets a storage holds (for a response: never their values)."""
    return sorted(name for name, value in _secrets(storage).items() if value)


def ensure_decryptable(storages: Iterable[BackupStorage]) -> None:
    """Raise one SecretsUndecryptable naming every storage whose secrets do not open."""
    failed = []
    for storage in storages:
        try:
            _secrets(storage)
        except SecretsUndecryptable:
            failed.append((storage.id, storage.name))
    if failed:
        raise SecretsUndecryptable(failed)


def reseal_secrets(storages: Iterable[BackupStorage]) -> int:
    """Seal every storage's secrets again with the current IBP_SECRET_KEY (they may have been
    sealed with one of IBP_PREVIOUS_SECRET_KEYS); returns how many storages hold secrets.

    All or nothing: when some do not open with any key, raises SecretsUndecryptable naming
    every one of them and changes none.
    """
    sealed = [storage for storage in storages if storage.secrets_encrypted]
    ensure_decryptable(sealed)
    box = secret_box()
    for storage in sealed:
        assert storage.secrets_encrypted is not None
        storage.secrets_encrypted = box.reseal(storage.secrets_encrypted)
    return len(sealed)


async def open_driver(session: AsyncSession, storage_id: uuid.UUID) -> BackupStorageDriver:
    storage = await session.get(BackupStorage, storage_id)
    if storage is None:
        raise LookupError(f"backup storage {storage_id} no longer exists")
    return get_driver(storage.kind, driver_config(storage))


def backup_prefix(instance_id: uuid.UUID, chain_id: uuid.UUID, backup_id: uuid.UUID) -> str:
    """Layout on storage: <instance>/<chain>/<backup>/<disk>.qcow2 + manifest.json."""
    return f"{instance_id}/{chain_id}/{backup_id}"
