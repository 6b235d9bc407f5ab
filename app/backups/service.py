"""Backups as users see them: scoped reads, costs, and deletes that respect dependants."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.backups.schemas import BackupDeletion, BackupFileRead, BackupRead
from app.engine.chains import busy
from app.engine.lifecycle import mark_for_deletion
from app.errors import Conflict, NotFound
from app.models import Backup, BackupFile, Hypervisor, Instance, Location, User
from app.queues import JobQueue, enqueue_verify
from app.schemas import backup_costs
from app.units import size_human
from app.values import BackupStatus

BackupRow = tuple[Backup, str, Decimal | None]


def readable_backups(user: User) -> Select[Backup, str, Decimal | None]:
    """Every backup query goes through here: a backup, its instance's name and price."""
    stmt = (
        select(Backup, Instance.name, Location.backup_price_per_gb_month)
        .join(Instance, Instance.id == Backup.instance_id)
        .join(Hypervisor, Hypervisor.id == Instance.hypervisor_id)
        .join(Location, Location.id == Hypervisor.location_id)
    )
    if not user.is_admin:
        stmt = stmt.where(Instance.owner_id == user.id)
    return stmt


def list_statement(
    user: User,
    *,
    policy_id: uuid.UUID | None = None,
    instance_id: uuid.UUID | None = None,
    status: str | None = None,
    type_: str | None = None,
) -> Select[Backup, str, Decimal | None]:
    stmt = readable_backups(user)
    if policy_id is not None:
        stmt = stmt.where(Backup.policy_id == policy_id)
    if instance_id is not None:
        stmt = stmt.where(Backup.instance_id == instance_id)
    if status is not None:
        stmt = stmt.where(Backup.status == status)
    if type_ is not None:
        stmt = stmt.where(Backup.type == type_)
    return stmt.order_by(Backup.created_at.desc(), Backup.id.desc())


async def to_reads(
    session: AsyncSession, viewer: User, rows: Sequence[BackupRow]
) -> list[BackupRead]:
    """`viewer` is who reads: only admins get the operator's detail of an error."""
    ids = [row[0].id for row in rows]
    files: dict[uuid.UUID, list[BackupFileRead]] = defaultdict(list)
    if ids:
        for f in await session.scalars(
            select(BackupFile).where(BackupFile.backup_id.in_(ids)).order_by(BackupFile.disk_target)
        ):
            files[f.backup_id].append(
                BackupFileRead(disk=f.disk_target, size_bytes=f.size_bytes, sha256=f.sha256)
            )
    # A point restores only if every file of its chain up to it is there.
    broken_since: dict[uuid.UUID | None, datetime] = {}
    chain_ids = {row[0].chain_id for row in rows if row[0].chain_id is not None}
    if chain_ids:
        broken_since = dict(
            (
                await session.execute(
                    select(Backup.chain_id, func.min(Backup.created_at))
                    .where(Backup.chain_id.in_(chain_ids), Backup.files_missing_at.is_not(None))
                    .group_by(Backup.chain_id)
                )
            )
            .tuples()
            .all()
        )
    reads = []
    for backup, instance_name, price in rows:
        broken = broken_since.get(backup.chain_id) if backup.chain_id else None
        monthly, hourly = backup_costs(backup.size_bytes, price)
        reads.append(
            BackupRead(
                id=backup.id,
                instance_id=backup.instance_id,
                instance_name=instance_name,
                policy_id=backup.policy_id,
                chain_id=backup.chain_id,
                parent_id=backup.parent_id,
                type=backup.type,
                status=backup.status,
                manual=backup.manual,
                backup_device=backup.backup_device,
                size_bytes=backup.size_bytes,
                size_human=size_human(backup.size_bytes),
                progress=backup.progress,
                scheduled_for=backup.scheduled_for,
                created_at=backup.created_at,
                started_at=backup.started_at,
                completed_at=backup.completed_at,
                error=backup.error,
                error_detail=(backup.error_detail or backup.error) if viewer.is_admin else None,
                plan_reason=backup.plan_reason,
                chain_reset_reason=backup.chain_reset_reason,
                verified_at=backup.verified_at,
                verify_ok=backup.verify_ok,
                verify_error=backup.verify_error,
                verify_error_detail=(backup.verify_error_detail or backup.verify_error)
                if viewer.is_admin
                else None,
                files_missing_at=backup.files_missing_at,
                restorable=backup.status == BackupStatus.COMPLETED
                and (broken is None or broken > backup.created_at),
                files=files.get(backup.id, []),
                monthly_cost=monthly,
                hourly_cost=hourly,
            )
        )
    return reads


async def get_backup_row(session: AsyncSession, user: User, backup_id: uuid.UUID) -> BackupRow:
    row = (await session.execute(readable_backups(user).where(Backup.id == backup_id))).first()
    if row is None:
        raise NotFound("Backup not found")
    return row[0], row[1], row[2]


async def read_backup(session: AsyncSession, user: User, backup_id: uuid.UUID) -> BackupRead:
    return (await to_reads(session, user, [await get_backup_row(session, user, backup_id)]))[0]


async def dependants_of(session: AsyncSession, backup: Backup) -> list[Backup]:
    """Backups that need this one to restore: later members of the same chain."""
    if backup.chain_id is None or backup.status == BackupStatus.FAILED:
        return []
    stmt = (
        select(Backup)
        .where(
            Backup.chain_id == backup.chain_id,
            Backup.id != backup.id,
            Backup.created_at >= backup.created_at,
            Backup.status.not_in((BackupStatus.FAILED, BackupStatus.DELETING)),
        )
        .order_by(Backup.created_at)
        .with_for_update()
    )
    return list((await session.scalars(stmt)).all())


async def delete_backup(
    session: AsyncSession, user: User, backup_id: uuid.UUID, cascade: bool, jobs: JobQueue
) -> BackupDeletion:
    backup, _, _ = await get_backup_row(session, user, backup_id)
    await session.refresh(backup, with_for_update=True)
    if backup.status == BackupStatus.DELETING:
        return BackupDeletion(backup_ids=[backup.id])
    # A restore may be reading this very chain, an incremental building on its tip.
    if (work := await busy(session, backup.instance_id)) is not None:
        extra = {"backup_ids": [str(work.id)]} if work.kind == "backup" else {}
        raise Conflict(f"{work}; delete backups when it finishes", **extra)
    doomed = [backup, *await dependants_of(session, backup)]
    if len(doomed) > 1 and not cascade:
        names = ", ".join(f"{b.type} {b.id}" for b in doomed[1:])
        raise Conflict(
            f"{len(doomed) - 1} later backup(s) depend on this one: {names}. "
            "Delete with ?cascade=true to delete them too.",
            dependants=[str(b.id) for b in doomed[1:]],
        )
    ids = [b.id for b in doomed]
    await mark_for_deletion(session, ids, jobs)
    return BackupDeletion(backup_ids=ids)


async def request_verify(
    session: AsyncSession, user: User, backup_id: uuid.UUID, jobs: JobQueue
) -> BackupRead:
    row = await get_backup_row(session, user, backup_id)
    backup = row[0]
    if backup.status != BackupStatus.COMPLETED:
        raise Conflict(f"Only completed backups can be verified (this one is {backup.status})")
    hypervisor_id = await session.scalar(
        select(Instance.hypervisor_id).where(Instance.id == backup.instance_id)
    )
    assert hypervisor_id is not None
    enqueue_verify(jobs, backup.id, hypervisor_id)
    return (await to_reads(session, user, [row]))[0]
