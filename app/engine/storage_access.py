"""Opening the storage driver that holds (or will hold) a backup, with operator-facing errors."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.models import BackupStorage
from app.security import secret_box
from app.storage.base import BackupStorageDriver
from app.storage.registry import get_driver


def driver_config(storage: BackupStorage) -> dict[str, Any]:
    """The whole config with secrets decrypted: for a storage driver, never for a response."""
    return {**storage.config, **secret_box().decrypt(storage.secrets_encrypted)}


async def open_driver(session: AsyncSession, storage_id: uuid.UUID) -> BackupStorageDriver:
    storage = await session.get(BackupStorage, storage_id)
    if storage is None:
        raise LookupError(f"backup storage {storage_id} no longer exists")
    return get_driver(storage.kind, driver_config(storage))


def backup_prefix(instance_id: uuid.UUID, chain_id: uuid.UUID, backup_id: uuid.UUID) -> str:
    """Layout on storage: <instance>/<chain>/<backup>/<disk>.qcow2 + manifest.json."""
    return f"{instance_id}/{chain_id}/{backup_id}"
