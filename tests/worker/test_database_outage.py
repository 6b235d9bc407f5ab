"""A backup rides out a PostgreSQL outage: its heartbeat comes back, and its outcome is
recorded once the database is back (the bytes are already safe), never orphaned."""

from __future__ import annotations

import asyncio
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


async def _started(world: World, job: asyncio.Task[str]) -> None:
    while not _job_running(world.vm):
        assert not job.done(), await job
        await asyncio.sleep(0.01)


async def test_the_heartbeat_survives_a_database_outage(
    world: World,
    worker_ctx: JobContext,
    real_sessionmaker: Maker,
    committed_engine: AsyncEngine,
) -> None:
    vm = world.vm
    vmkit.write_pattern(vm.name, "vda", 0x42, 0, 48 * MiB)
    backup_id = await _pending(real_sessionmaker, world, "full")
    job = asyncio.create_task(run_backup(worker_ctx, str(backup_id)))
    await _started(world, job)
    vmkit.throttle_block_jobs(vm.name, 1 * MiB)  # keeps running through the outage
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
    vmkit.write_pattern(vm.name, "vda", 0x43, 0, 48 * MiB)
    backup_id = await _pending(real_sessionmaker, world, "full")
    job = asyncio.create_task(run_backup(worker_ctx, str(backup_id)))
    await _started(world, job)
    vmkit.throttle_block_jobs(vm.name, 1 * MiB)
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
