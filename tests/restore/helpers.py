"""Small helpers for the restore tests: backups, restores and verifies run as the worker would."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import libvirt
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.models import Backup, BackupFile, Instance, Restore
from tests.virt import vmkit
from tests.worker.conftest import World
from worker.jobs import JobContext
from worker.tasks.backup import run_backup
from worker.tasks.restore import run_restore
from worker.tasks.verify import verify_backup

Maker = async_sessionmaker[AsyncSession]
DISKS = ("vda", "vdb")


async def take_backup(ctx: JobContext, maker: Maker, world: World, type_: str) -> Backup:
    now = datetime.now(UTC)
    async with maker() as session:
        backup = Backup(
            id=uuid.uuid4(),
            instance_id=world.instance.id,
            policy_id=world.policy.id,
            type=type_,
            status="pending",
            scheduled_for=now,
            created_at=now,
            backup_device="all",
        )
        session.add(backup)
        await session.commit()
    await run_backup(ctx, str(backup.id))
    return await get_backup(maker, backup.id)


async def get_backup(maker: Maker, backup_id: uuid.UUID) -> Backup:
    async with maker() as session:
        backup = await session.get(Backup, backup_id)
        assert backup is not None
        return backup


async def restore(
    ctx: JobContext, maker: Maker, world: World, backup_id: uuid.UUID, target: str
) -> Restore:
    async with maker() as session:
        row = Restore(
            id=uuid.uuid4(),
            backup_id=backup_id,
            instance_id=world.instance.id,
            target=target,
            status="pending",
            result={},
            created_at=datetime.now(UTC),
        )
        session.add(row)
        await session.commit()
    await run_restore(ctx, str(row.id))
    async with maker() as session:
        done = await session.get(Restore, row.id)
        assert done is not None
        return done


async def verify(ctx: JobContext, maker: Maker, backup_id: uuid.UUID) -> Backup:
    await verify_backup(ctx, str(backup_id))
    return await get_backup(maker, backup_id)


async def files_of(maker: Maker, backup_id: uuid.UUID) -> dict[str, BackupFile]:
    async with maker() as session:
        rows = await session.scalars(select(BackupFile).where(BackupFile.backup_id == backup_id))
        return {f.disk_target: f for f in rows}


async def set_instance_status(maker: Maker, world: World, status: str) -> None:
    async with maker() as session:
        await session.execute(
            update(Instance).where(Instance.id == world.instance.id).values(status=status)
        )
        await session.commit()


def stop_vm(vm: vmkit.VM) -> None:
    conn = libvirt.open(vm.uri)
    try:
        conn.lookupByName(vm.name).destroy()
    finally:
        conn.close()


def snap(vm: vmkit.VM, directory: Path, label: str) -> dict[str, Path]:
    return {t: vmkit.snapshot_disk(vm.name, t, directory / f"{label}-{t}.raw") for t in DISKS}
