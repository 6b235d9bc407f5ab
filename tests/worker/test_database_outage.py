"""A backup rides out a PostgreSQL outage: its heartbeat comes back, and its outcome is
recorded once the database is back (the bytes are already safe), never orphaned."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.models import Backup, BackupFile
from tests.virt import vmkit
from tests.virt.vmkit import MiB
from tests.worker.conftest import World
from tests.worker.outage import cut_database, read, restore_database
from tests.worker.test_backup_job import _job_running, _pending
from worker.jobs import HEARTBEAT_S, JobContext
from worker.tasks.backup import run_backup

Maker = async_sessionmaker[AsyncSession]


async def _slow_backup(
    world: World, ctx: JobContext, maker: Maker, pattern: int
) -> tuple[uuid.UUID, asyncio.Task[str]]:
    """A full backup running in a task, its libvirt job slowed so it outlasts what follows."""
    vmkit.write_pattern(world.vm.name, "vda", pattern, 0, 48 * MiB)
    backup_id = await _pending(maker, world, "full")
    job = asyncio.create_task(run_backup(ctx, str(backup_id)))
    while not _job_running(world.vm):
        assert not job.done(), await job
        await asyncio.sleep(0.01)
    vmkit.throttle_block_jobs(world.vm.name, 1 * MiB)
    return backup_id, job


async def test_the_heartbeat_survives_a_database_outage(
    world: World,
    worker_ctx: JobContext,
    real_sessionmaker: Maker,
    committed_engine: AsyncEngine,
) -> None:
    vm = world.vm
    backup_id, job = await _slow_backup(world, worker_ctx, real_sessionmaker, 0x42)
    await cut_database()
    try:
        await asyncio.sleep(3 * HEARTBEAT_S)
    finally:
        await restore_database()
    back: datetime = await read("SELECT now()")  # type: ignore[assignment]
    await asyncio.sleep(3 * HEARTBEAT_S)
    beat: datetime = await read(  # type: ignore[assignment]
        "SELECT heartbeat_at FROM backups WHERE id = $1", backup_id
    )
    assert beat > back, "the heartbeat stopped at the outage"
    vmkit.throttle_block_jobs(vm.name, 0)
    assert await job == "completed full"
    await committed_engine.dispose()  # the test's own pool holds killed connections
    async with real_sessionmaker() as session:
        backup = await session.get(Backup, backup_id)
        assert backup is not None and backup.status == "completed"


async def test_an_outage_at_the_end_is_waited_out_and_the_backup_recorded(
    world: World,
    worker_ctx: JobContext,
    real_sessionmaker: Maker,
    committed_engine: AsyncEngine,
) -> None:
    """The libvirt job and the upload end while PostgreSQL is away: recording waits for it."""
    vm = world.vm
    backup_id, job = await _slow_backup(world, worker_ctx, real_sessionmaker, 0x43)
    await cut_database()
    try:
        vmkit.throttle_block_jobs(vm.name, 0)
        while _job_running(vm):
            await asyncio.sleep(0.05)
        await asyncio.sleep(2)  # the files are stored; recording has been refused meanwhile
        assert not job.done(), await job
    finally:
        await restore_database()
    assert await job == "completed full"
    await committed_engine.dispose()
    async with real_sessionmaker() as session:
        backup = await session.get(Backup, backup_id)
        assert backup is not None and backup.status == "completed", backup and backup.error
        files = (
            await session.scalars(select(BackupFile).where(BackupFile.backup_id == backup_id))
        ).all()
    stored = {
        str(p.relative_to(world.storage_dir)) for p in world.storage_dir.rglob("*") if p.is_file()
    }
    assert {f.object_key for f in files} < stored
    assert stored - {f.object_key for f in files} == {
        f"{world.instance.id}/{backup.chain_id}/{backup_id}/manifest.json"
    }
