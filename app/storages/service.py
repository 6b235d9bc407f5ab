"""Backup storages: validated per kind, secrets encrypted at rest, checks sent to a worker."""

from __future__ import annotations

import posixpath
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Select, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import get_settings
from app.db import flush_or_conflict
from app.engine.storage_access import driver_config, ensure_decryptable, secrets_set
from app.engine.workers import is_live, no_worker
from app.errors import Conflict, NotFound, SecretsUndecryptable, Unprocessable
from app.models import Backup, BackupChain, BackupStorage, Hypervisor, Worker
from app.queues import JobQueue, enqueue_storage_check
from app.schemas import Page, PageParams, fetch_page
from app.security import SecretBox, secret_box
from app.storages.schemas import (
    CONFIG_MODELS,
    DESTINATION_FIELDS,
    SECRET_FIELDS,
    BackupStorageCreate,
    BackupStorageRead,
    BackupStorageUpdate,
)
from app.values import StorageKind, StorageStatus

# The kinds whose `path` is a directory on the hypervisor, kept under IBP_STORAGE_ROOTS.
ROOTED_KINDS = (StorageKind.LOCAL, StorageKind.NFS)


def storages_statement() -> Select[BackupStorage]:
    return select(BackupStorage).order_by(BackupStorage.name, BackupStorage.id)


def to_read(storage: BackupStorage) -> BackupStorageRead:
    return BackupStorageRead(
        id=storage.id,
        name=storage.name,
        kind=storage.kind,
        config=dict(storage.config),
        secrets_set=secrets_set(storage),
        status=storage.status,
        last_error=storage.last_error,
        last_checked_at=storage.last_checked_at,
        created_at=storage.created_at,
        updated_at=storage.updated_at,
    )


async def storages_page(session: AsyncSession, params: PageParams) -> Page[BackupStorageRead]:
    """One page; a 409 naming every storage on it whose secrets the current key cannot open
    (rather than a 500 at the first)."""
    rows, total = await fetch_page(session, storages_statement(), params)
    storages = [row[0] for row in rows]
    ensure_decryptable(storages)
    return Page(
        items=[to_read(s) for s in storages], total=total, limit=params.limit, offset=params.offset
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


def _within_roots(kind: str, config: dict[str, Any]) -> None:
    """A local or NFS path lies under a configured storage root: a storage (and the probe a
    check writes) cannot be pointed at any directory of the hypervisor."""
    if kind not in ROOTED_KINDS:
        return
    path = posixpath.normpath(str(config["path"]))
    roots = get_settings().storage_roots
    if any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots):
        return
    message = f"must lie under one of the storage roots (IBP_STORAGE_ROOTS): {', '.join(roots)}"
    raise Unprocessable(
        f"config.path: {message}",
        errors=[{"field": "config.path", "message": message, "type": "path_not_allowed"}],
    )


async def get_storage(session: AsyncSession, storage_id: uuid.UUID) -> BackupStorage:
    storage = await session.get(BackupStorage, storage_id)
    if storage is None:
        raise NotFound("Backup storage not found")
    return storage


async def create_storage(session: AsyncSession, payload: BackupStorageCreate) -> BackupStorage:
    config = payload.config.model_dump(mode="json")
    _within_roots(payload.kind, config)
    storage = BackupStorage(
        id=uuid.uuid4(), name=payload.name, kind=payload.kind, status=StorageStatus.UNKNOWN
    )
    _store(storage, config, secret_box())
    session.add(storage)
    await flush_or_conflict(session, f"A backup storage named '{payload.name}' already exists")
    return storage


def _updated_config(storage: BackupStorage, changes: dict[str, Any]) -> dict[str, Any]:
    """The stored config with `changes` applied, validated. Stored secrets are carried over
    only while their destination stays: any change of a DESTINATION_FIELDS value needs the
    secrets in `changes`, and then only those given are kept."""
    kind, public = storage.kind, dict(storage.config)
    secret_names = SECRET_FIELDS[kind]
    given = [name for name in secret_names if changes.get(name) is not None]
    moved = [f for f in DESTINATION_FIELDS[kind] if f in changes and changes[f] != public.get(f)]
    if moved and not given:
        message = (
            f"changing {', '.join(moved)} needs the secrets given again in the same request "
            f"({' or '.join(secret_names)}): stored secrets never go to a new destination"
        )
        raise Unprocessable(
            f"config: {message}",
            errors=[
                {"field": f"config.{name}", "message": message, "type": "secret_required"}
                for name in secret_names
            ],
        )
    carried: dict[str, Any] = {}
    if not moved:
        try:
            stored = driver_config(storage)
        except SecretsUndecryptable:
            if not given:
                raise
            stored = {}  # what the old key sealed is lost; the secrets given replace it
        carried = {k: v for k, v in stored.items() if k in secret_names}
    merged = {**public, **carried, **changes}
    merged = {k: v for k, v in merged.items() if v is not None}
    try:
        return CONFIG_MODELS[kind].model_validate(merged).model_dump(mode="json")
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


async def update_storage(
    session: AsyncSession, storage: BackupStorage, payload: BackupStorageUpdate
) -> BackupStorage:
    if payload.name is not None:
        storage.name = payload.name
    if payload.config is not None:
        config = _updated_config(storage, payload.config)
        _within_roots(storage.kind, config)
        _store(storage, config, secret_box())
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


async def request_check(
    session: AsyncSession, storage: BackupStorage, jobs: JobQueue
) -> BackupStorage:
    """Mark the storage `checking` and send a check job to a hypervisor that uses it.

    The check runs where backups run (the hypervisor's worker), never in the API process: the
    API host's network is not the storage's, and a request must not wait on a slow server.
    """
    ensure_decryptable([storage])
    hypervisor_id = await _checking_hypervisor(session, storage)
    storage.status = StorageStatus.CHECKING
    storage.last_error = None
    enqueue_storage_check(jobs, storage.id, hypervisor_id)
    return storage


async def _checking_hypervisor(session: AsyncSession, storage: BackupStorage) -> uuid.UUID:
    """The first (by name) hypervisor using the storage whose worker is alive."""
    users = (
        await session.execute(
            select(Hypervisor.id, Hypervisor.name)
            .where(Hypervisor.backup_storage_id == storage.id)
            .order_by(Hypervisor.name)
        )
    ).all()
    if not users:
        raise Conflict(
            f"Backup storage '{storage.name}' is used by no hypervisor: attach it to one first. "
            "A check runs on a hypervisor's worker, where backups run."
        )
    served = set(
        await session.scalars(
            select(Worker.hypervisor_id).where(
                Worker.hypervisor_id.in_([hv_id for hv_id, _ in users]),
                is_live(datetime.now(UTC)),
            )
        )
    )
    for hv_id, _ in users:
        if hv_id in served:
            return hv_id
    raise Conflict(
        f"{no_worker(', '.join(name for _, name in users))}: the check of backup storage "
        f"'{storage.name}' runs there"
    )
