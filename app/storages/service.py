"""Backup storages: validated per kind, secrets encrypted at rest, health checks."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Select, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import flush_or_conflict
from app.engine.storage_access import driver_config
from app.errors import Conflict, NotFound, Unprocessable
from app.models import Backup, BackupChain, BackupStorage, Hypervisor
from app.security import SecretBox, secret_box
from app.storages.schemas import (
    CONFIG_MODELS,
    SECRET_FIELDS,
    BackupStorageCreate,
    BackupStorageRead,
    BackupStorageUpdate,
    StorageCheckResult,
)
from app.values import StorageStatus


def storages_statement() -> Select[BackupStorage]:
    return select(BackupStorage).order_by(BackupStorage.name, BackupStorage.id)


def to_read(storage: BackupStorage) -> BackupStorageRead:
    secrets = secret_box().decrypt(storage.secrets_encrypted)
    return BackupStorageRead(
        id=storage.id,
        name=storage.name,
        kind=storage.kind,
        config=dict(storage.config),
        secrets_set=sorted(k for k, v in secrets.items() if v),
        status=storage.status,
        last_error=storage.last_error,
        last_checked_at=storage.last_checked_at,
        created_at=storage.created_at,
        updated_at=storage.updated_at,
    )


def _split(kind: str, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    secret_names = SECRET_FIELDS[kind]
    public = {k: v for k, v in config.items() if k not in secret_names}
    secrets = {k: v for k, v in config.items() if k in secret_names and v is not None}
    return public, secrets


def _store(storage: BackupStorage, full_config: dict[str, Any], box: SecretBox) -> None:
    public, secrets = _split(storage.kind, full_config)
    storage.config = public
    storage.secrets_encrypted = box.encrypt(secrets) if secrets else None


async def get_storage(session: AsyncSession, storage_id: uuid.UUID) -> BackupStorage:
    storage = await session.get(BackupStorage, storage_id)
    if storage is None:
        raise NotFound("Backup storage not found")
    return storage


async def create_storage(session: AsyncSession, payload: BackupStorageCreate) -> BackupStorage:
    storage = BackupStorage(
        id=uuid.uuid4(), name=payload.name, kind=payload.kind, status=StorageStatus.UNKNOWN
    )
    _store(storage, payload.config.model_dump(mode="json"), secret_box())
    session.add(storage)
    await flush_or_conflict(session, f"A backup storage named '{payload.name}' already exists")
    return storage


async def update_storage(
    session: AsyncSession, storage: BackupStorage, payload: BackupStorageUpdate
) -> BackupStorage:
    if payload.name is not None:
        storage.name = payload.name
    if payload.config is not None:
        merged = {**driver_config(storage), **payload.config}
        merged = {k: v for k, v in merged.items() if v is not None}
        try:
            config = CONFIG_MODELS[storage.kind].model_validate(merged)
        except ValidationError as exc:
            errors = [
                {
                    "field": ".".join(["config", *(str(p) for p in e["loc"])]),
                    "message": e["msg"],
                    "type": e["type"],
                }
                for e in exc.errors()
            ]
            detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
            raise Unprocessable(detail, errors=errors) from exc
        _store(storage, config.model_dump(mode="json"), secret_box())
        storage.status = StorageStatus.UNKNOWN
        storage.last_error = None
    await flush_or_conflict(session, f"A backup storage named '{storage.name}' already exists")
    return storage


async def delete_storage(session: AsyncSession, storage: BackupStorage) -> None:
    if await session.scalar(
        select(Hypervisor.id).where(Hypervisor.backup_storage_id == storage.id).limit(1)
    ):
        raise Conflict("Backup storage is used by a hypervisor; point it elsewhere first")
    in_use = await session.scalar(
        select(Backup.id)
        .outerjoin(BackupChain, BackupChain.id == Backup.chain_id)
        .where(or_(Backup.storage_id == storage.id, BackupChain.storage_id == storage.id))
        .limit(1)
    )
    if in_use:
        raise Conflict("Backup storage still holds backups; delete them first")
    await session.delete(storage)


async def check_storage(session: AsyncSession, storage: BackupStorage) -> StorageCheckResult:
    from app.storage.registry import get_driver

    try:
        driver = get_driver(storage.kind, driver_config(storage))
    except Exception as exc:  # a config the driver refuses is an operator-facing error
        result = StorageCheckResult(ok=False, latency_ms=None, free_bytes=None, error=str(exc))
    else:
        try:
            checked = await driver.check()
        finally:
            await driver.close()
        result = StorageCheckResult(
            ok=checked.ok,
            latency_ms=checked.latency_ms,
            free_bytes=checked.free_bytes,
            error=checked.error,
        )
    storage.status = StorageStatus.OK if result.ok else StorageStatus.ERROR
    storage.last_error = result.error
    storage.last_checked_at = datetime.now(UTC)
    return result
