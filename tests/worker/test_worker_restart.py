"""A hypervisor worker killed mid-backup: its successor cleans up within seconds of starting."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from arq.connections import ArqRedis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import virt
from app.models import Backup, Worker
from app.queues import JobQueue, enqueue_backup
from tests.virt import vmkit
from tests.virt.images import job_running
from tests.virt.vmkit import MiB
from tests.worker.conftest import World
from tests.worker.test_backup_job import _job_running, _pending

Maker = async_sessionmaker[AsyncSession]


def _start_worker(world: World) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from app.cli import main; main()",
            "worker",
            "--hypervisor",
            world.hypervisor.name,
            "--no-control",
        ],
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


async def _status(maker: Maker, backup_id: object) -> Backup:
    async with maker() as session:
        backup = await session.get(Backup, backup_id)
        assert backup is not None
        return backup


async def test_a_killed_worker_is_cleaned_up_by_the_next_one_within_seconds(
    world: World, real_sessionmaker: Maker, arq_redis: ArqRedis
) -> None:
    vm, maker = world.vm, real_sessionmaker
    vmkit.write_pattern(vm.name, "vda", 0x66, 0, 48 * MiB)
    backup_id = await _pending(maker, world, "full")
    jobs = JobQueue()
    enqueue_backup(jobs, backup_id, world.hypervisor.id)
    await jobs.flush(arq_redis)
    loop = asyncio.get_running_loop()
    first = _start_worker(world)
    try:
        deadline = loop.time() + 90
        while not _job_running(vm):
            assert first.poll() is None, first.stdout.read() if first.stdout else ""
            assert loop.time() < deadline, "the backup never started"
            await asyncio.sleep(0.05)
        vmkit.throttle_block_jobs(vm.name, 1 * MiB)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert (await _status(maker, backup_id)).status == "in_progress"
    scratch = Path(world.hypervisor.scratch_dir)
    assert list(scratch.glob(f"ibp-{backup_id}-*")), "the killed job left no scratch file"
    # What a kill during the upload leaves on storage: an unfinished upload of the backup.
    partial = world.storage_dir / str(world.instance.id) / "c" / str(backup_id)
    partial.mkdir(parents=True)
    (partial / "vda.qcow2.part-0123456789abcdef").write_bytes(b"half an image")
    # And a verification the killed worker was running: its rebuilt disks.
    verifying = scratch / f"verify-{backup_id}-0a1b" / "rebuilt"
    verifying.mkdir(parents=True)
    (verifying / "vda.qcow2").write_bytes(b"rebuilt image")

    second = _start_worker(world)
    try:
        started = loop.time()
        while (await _status(maker, backup_id)).status == "in_progress":
            assert second.poll() is None, second.stdout.read() if second.stdout else ""
            assert loop.time() - started < 20, "not recovered within seconds of starting"
            await asyncio.sleep(0.2)
        failed = await _status(maker, backup_id)
        assert failed.status == "failed"
        assert failed.error is not None and "worker stopped" in failed.error.lower()
        assert not job_running(vm.uri, vm.name)
        assert not list(scratch.iterdir())
        assert f"ibp-{backup_id}" not in virt.list_checkpoints(vm.uri, vm.name)
        assert not list(partial.iterdir())
        # A worker told to stop says so: its successor need not wait to know it is gone.
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
        async with maker() as session:
            rows = (await session.execute(select(Worker.pid, Worker.stopped_at))).all()
        assert {pid: stopped is not None for pid, stopped in rows} == {
            first.pid: True,
            second.pid: True,
        }
    finally:
        if second.poll() is None:
            second.kill()
