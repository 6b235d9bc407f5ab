"""The backup job on a real QEMU VM (TCG) with real libvirt, writing to local storage."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import libvirt
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import virt
from app.models import Backup, BackupChain, BackupFile, BackupPolicy, Hypervisor
from app.scheduling import STORAGE_CHANGED
from tests.virt import vmkit
from tests.virt.images import compare_images, job_running
from tests.virt.vmkit import MiB
from tests.worker.conftest import World, local_storage
from worker.jobs import JobContext
from worker.tasks.backup import run_backup

Maker = async_sessionmaker[AsyncSession]


async def _pending(maker: Maker, world: World, type_: str = "full", **extra: object) -> uuid.UUID:
    now = datetime.now(UTC)
    async with maker() as session:
        policy = await session.get(BackupPolicy, world.policy.id)
        assert policy is not None
        backup = Backup(
            id=uuid.uuid4(),
            instance_id=world.instance.id,
            policy_id=policy.id,
            type=type_,
            status="pending",
            scheduled_for=now,
            created_at=now,
            backup_device=policy.backup_device,
            **extra,
        )
        session.add(backup)
        await session.commit()
        return backup.id


async def _run(ctx: JobContext, maker: Maker, world: World, type_: str = "full") -> Backup:
    backup_id = await _pending(maker, world, type_)
    await run_backup(ctx, str(backup_id))
    async with maker() as session:
        backup = await session.get(Backup, backup_id)
        assert backup is not None
        return backup


async def _files(maker: Maker, backup: Backup) -> dict[str, BackupFile]:
    async with maker() as session:
        rows = await session.scalars(select(BackupFile).where(BackupFile.backup_id == backup.id))
        return {f.disk_target: f for f in rows}


def _restore(storage: Path, key: str, out: Path) -> Path:
    """The stored chain is self-describing: each incremental's backing file is its parent's
    stored name, so converting the newest file in place rebuilds the point."""
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(storage / key), str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


async def _set_policy(maker: Maker, world: World, **values: object) -> None:
    async with maker() as session:
        await session.execute(
            update(BackupPolicy).where(BackupPolicy.id == world.policy.id).values(**values)
        )
        await session.commit()


async def test_full_then_incrementals_restore_every_point_bit_for_bit(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker, tmp_path: Path
) -> None:
    vm, maker = world.vm, real_sessionmaker
    vmkit.write_pattern(vm.name, "vda", 0x11, 0, 16 * MiB)
    vmkit.write_pattern(vm.name, "vdb", 0x22, 4 * MiB, 1 * MiB)
    points: list[tuple[Backup, dict[str, Path]]] = []

    def snap(label: str) -> dict[str, Path]:
        return {
            t: vmkit.snapshot_disk(vm.name, t, tmp_path / f"{label}-{t}.raw")
            for t in ("vda", "vdb")
        }

    expected = snap("p0")
    full = await _run(worker_ctx, maker, world, "full")
    assert full.status == "completed", full.error
    points.append((full, expected))
    for i, (offset, length) in enumerate([(8 * MiB, MiB + 512 * 1024), (20 * MiB, 64 * 1024)]):
        vmkit.write_pattern(vm.name, "vda", 0x30 + i, offset + 24 * MiB, length)
        vmkit.write_pattern(vm.name, "vdb", 0x40 + i, offset // 2, length)
        expected = snap(f"p{i + 1}")
        inc = await _run(worker_ctx, maker, world, "incremental")
        assert inc.status == "completed", inc.error
        assert inc.type == "incremental" and inc.chain_id == full.chain_id
        assert inc.parent_id == points[-1][0].id
        points.append((inc, expected))

    for backup, snapshot in points:
        files = await _files(maker, backup)
        assert set(files) == {"vda", "vdb"}
        for target, f in files.items():
            stored = world.storage_dir / f.object_key
            assert (
                f.object_key == f"{world.instance.id}/{backup.chain_id}/{backup.id}/{target}.qcow2"
            )
            assert stored.stat().st_size == f.size_bytes
            restored = _restore(
                world.storage_dir, f.object_key, tmp_path / f"r-{backup.id}-{target}.raw"
            )
            assert compare_images(restored, snapshot[target]), f"{backup.type} {target} differs"
        assert (stored.parent / "manifest.json").exists()

    # An incremental holds what changed, not the disk: 1.5 MiB written on vda, 1.5 MiB on vdb.
    first_inc = points[1][0]
    assert first_inc.size_bytes is not None and full.size_bytes is not None
    assert 3 * MiB <= first_inc.size_bytes < 3 * MiB + 2 * MiB
    assert first_inc.size_bytes < full.size_bytes
    # Only the newest checkpoint stays on the domain.
    assert virt.list_checkpoints(vm.uri, vm.name) == [f"ibp-{points[-1][0].id}"]


async def test_primary_device_backs_up_only_the_boot_disk(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker
) -> None:
    await _set_policy(real_sessionmaker, world, backup_device="primary")
    backup = await _run(worker_ctx, real_sessionmaker, world, "full")
    assert backup.status == "completed", backup.error
    assert set(await _files(real_sessionmaker, backup)) == {"vda"}


async def test_stopped_vm_fails_clearly_and_sets_the_policy_to_error(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker
) -> None:
    conn = libvirt.open(world.vm.uri)
    try:
        conn.lookupByName(world.vm.name).destroy()
    finally:
        conn.close()
    backup = await _run(worker_ctx, real_sessionmaker, world, "full")
    assert backup.status == "failed"
    assert backup.error == "Instance is not running (libvirt state: shut off)"
    async with real_sessionmaker() as session:
        policy = await session.get(BackupPolicy, world.policy.id)
        assert policy is not None and policy.status == "error"
        assert policy.last_error == f"{world.instance.name}: {backup.error}"
    assert not list(world.storage_dir.rglob("*.qcow2"))


async def test_suspended_vm_fails_with_its_state(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker
) -> None:
    conn = libvirt.open(world.vm.uri)
    try:
        conn.lookupByName(world.vm.name).suspend()
    finally:
        conn.close()
    backup = await _run(worker_ctx, real_sessionmaker, world, "full")
    assert backup.error == "Instance is not running (libvirt state: paused)"


async def test_killed_qemu_resets_the_chain_then_incrementals_work_again(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker, tmp_path: Path
) -> None:
    vm, maker = world.vm, real_sessionmaker
    full = await _run(worker_ctx, maker, world, "full")
    assert full.status == "completed", full.error
    vmkit.write_pattern(vm.name, "vda", 0x55, 0, MiB)
    vmkit.kill_qemu(vm.name)  # bitmaps are lost with a SIGKILL
    vmkit.start_vm(vm.name)
    reset = await _run(worker_ctx, maker, world, "incremental")
    assert reset.status == "completed", reset.error
    assert reset.type == "full" and reset.chain_id != full.chain_id
    assert reset.chain_reset_reason and "checkpoint" in reset.chain_reset_reason.lower()

    vmkit.write_pattern(vm.name, "vda", 0x66, 3 * MiB, MiB)
    expected = vmkit.snapshot_disk(vm.name, "vda", tmp_path / "after.raw")
    inc = await _run(worker_ctx, maker, world, "incremental")
    assert inc.status == "completed", inc.error
    assert inc.type == "incremental" and inc.parent_id == reset.id
    key = (await _files(maker, inc))["vda"].object_key
    assert compare_images(_restore(world.storage_dir, key, tmp_path / "r.raw"), expected)


async def test_added_data_disk_starts_a_new_chain(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker, tmp_path: Path
) -> None:
    vm, maker = world.vm, real_sessionmaker
    full = await _run(worker_ctx, maker, world, "full")
    assert full.status == "completed", full.error
    extra = tmp_path / "vdc.qcow2"
    vmkit.create_disk(extra, 16 * MiB)
    attach = subprocess.run(
        [
            "virsh",
            "-c",
            vm.uri,
            "attach-disk",
            vm.name,
            str(extra),
            "vdc",
            "--driver",
            "qemu",
            "--subdriver",
            "qcow2",
            "--targetbus",
            "virtio",
            "--config",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert attach.returncode == 0, attach.stderr
    # The test VM has no ACPI hotplug: the disk arrives with a restart, as after maintenance.
    conn = libvirt.open(vm.uri)
    try:
        conn.lookupByName(vm.name).destroy()
    finally:
        conn.close()
    vmkit.start_vm(vm.name)
    nxt = await _run(worker_ctx, maker, world, "incremental")
    assert nxt.status == "completed", nxt.error
    assert nxt.type == "full" and nxt.chain_reset_reason == "disk vdc was added"
    assert set(await _files(maker, nxt)) == {"vda", "vdb", "vdc"}


def _job_running(vm: vmkit.VM) -> bool:
    try:
        return job_running(vm.uri, vm.name)
    except (virt.VirtError, libvirt.libvirtError):  # "backup job data missing" at its setup
        return True


async def test_worker_killed_mid_backup_leaves_nothing_stuck(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker
) -> None:
    vm, maker = world.vm, real_sessionmaker
    # Enough data that the stream still runs when the job is first seen.
    vmkit.write_pattern(vm.name, "vda", 0x77, 0, 60 * MiB)
    vmkit.write_pattern(vm.name, "vdb", 0x78, 0, 30 * MiB)
    backup_id = await _pending(maker, world, "full")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from app.cli import main; main()", "run-backup", str(backup_id)],
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while not _job_running(vm):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert asyncio.get_running_loop().time() < deadline, "backup job never started"
            await asyncio.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    async with maker() as session:
        stuck = await session.get(Backup, backup_id)
        assert stuck is not None and stuck.status == "in_progress"

    # arq runs the job again after the worker's death: the retry cleans up and fails it.
    retry_ctx = {**worker_ctx, "job_try": 2}
    await run_backup(retry_ctx, str(backup_id))  # type: ignore[arg-type]
    async with maker() as session:
        cleaned = await session.get(Backup, backup_id)
        assert cleaned is not None and cleaned.status == "failed"
        assert "worker stopped" in (cleaned.error or "").lower()
    assert not job_running(vm.uri, vm.name)
    assert not list(Path(world.hypervisor.scratch_dir).glob("*"))
    assert f"ibp-{backup_id}" not in virt.list_checkpoints(vm.uri, vm.name)

    again = await _run(worker_ctx, maker, world, "full")
    assert again.status == "completed", again.error


async def test_retention_deletes_the_oldest_chain_after_a_new_full(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker, arq_redis: object
) -> None:
    maker = real_sessionmaker
    await _set_policy(maker, world, retention_count=1, backup_device="primary")
    first = await _run(worker_ctx, maker, world, "full")
    second = await _run(worker_ctx, maker, world, "full")
    assert first.status == second.status == "completed"
    async with maker() as session:
        old = await session.get(Backup, first.id)
        assert old is not None and old.status == "deleting"
    from worker.tasks.deletion import delete_backup_files

    assert await delete_backup_files(worker_ctx, str(first.id)) == "deleted"
    assert not (
        world.storage_dir / str(world.instance.id) / str(first.chain_id)
    ).exists() or not list(
        (world.storage_dir / str(world.instance.id) / str(first.chain_id)).rglob("*.qcow2")
    )
    async with maker() as session:
        assert await session.get(Backup, first.id) is None
        assert (await session.get(Backup, second.id)) is not None


async def test_a_second_backup_of_a_busy_instance_is_skipped_not_run_alongside(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker
) -> None:
    running = await _pending(real_sessionmaker, world, "full")
    async with real_sessionmaker() as session:
        await session.execute(
            update(Backup).where(Backup.id == running).values(status="in_progress")
        )
        await session.commit()
    second = await _pending(real_sessionmaker, world, "full")
    await run_backup(worker_ctx, str(second))
    async with real_sessionmaker() as session:
        skipped = await session.get(Backup, second)
        assert skipped is not None and skipped.status == "failed"
        assert skipped.error == "Skipped: another backup of this instance was already running"
        policy = await session.get(BackupPolicy, world.policy.id)
        assert policy is not None and policy.status == "active"
    assert not job_running(world.vm.uri, world.vm.name)


async def _move_to_new_storage(maker: Maker, world: World, root: Path) -> uuid.UUID:
    """What an administrator does: a new storage, and the hypervisor pointed at it."""
    root.mkdir()
    async with maker() as session:
        storage = local_storage(root)
        session.add(storage)
        await session.flush()
        await session.execute(
            update(Hypervisor)
            .where(Hypervisor.id == world.hypervisor.id)
            .values(backup_storage_id=storage.id)
        )
        await session.commit()
    return storage.id


async def test_a_new_storage_starts_a_new_chain_that_restores(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker, tmp_path: Path
) -> None:
    maker = real_sessionmaker
    full = await _run(worker_ctx, maker, world, "full")
    assert full.status == "completed", full.error
    moved = await _move_to_new_storage(maker, world, tmp_path / "moved")
    nxt = await _run(worker_ctx, maker, world, "incremental")
    assert nxt.status == "completed", nxt.error
    assert (nxt.type, nxt.storage_id) == ("full", moved)
    assert nxt.chain_reset_reason == STORAGE_CHANGED and nxt.chain_id != full.chain_id
    # The new chain is whole on the new storage: its point rebuilds from there alone.
    files = await _files(maker, nxt)
    out = _restore(tmp_path / "moved", files["vda"].object_key, tmp_path / "vda.raw")
    assert out.stat().st_size == 64 * MiB
    after = await _run(worker_ctx, maker, world, "incremental")
    assert (after.status, after.type, after.chain_id) == ("completed", "incremental", nxt.chain_id)


async def test_an_incremental_whose_chain_moved_mid_backup_is_not_recorded(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker, tmp_path: Path
) -> None:
    """The catalog says the chain is elsewhere by the time the incremental is stored: its
    parent could not be reached from where it was written, so it must not be marked
    completed, and its files and checkpoint must not stay behind."""
    vm, maker = world.vm, real_sessionmaker
    full = await _run(worker_ctx, maker, world, "full")
    assert full.status == "completed", full.error
    elsewhere = await _move_to_new_storage(maker, world, tmp_path / "moved")
    async with maker() as session:  # the hypervisor keeps its storage: only the chain "moves"
        await session.execute(
            update(Hypervisor)
            .where(Hypervisor.id == world.hypervisor.id)
            .values(backup_storage_id=world.storage.id)
        )
        await session.commit()
    vmkit.write_pattern(vm.name, "vda", 0x5A, 0, 32 * MiB)
    backup_id = await _pending(maker, world, "incremental")
    job = asyncio.create_task(run_backup(worker_ctx, str(backup_id)))
    while not _job_running(vm):
        assert not job.done(), await job
        await asyncio.sleep(0.01)
    async with maker() as session:
        await session.execute(
            update(BackupChain).where(BackupChain.id == full.chain_id).values(storage_id=elsewhere)
        )
        await session.commit()
    assert (await job).startswith("failed")
    async with maker() as session:
        nxt = await session.get(Backup, backup_id)
        assert nxt is not None and nxt.status == "failed"
        assert "storage changed" in (nxt.error or "")
    assert not list(world.storage_dir.rglob(f"{backup_id}/*"))
    assert f"ibp-{backup_id}" not in virt.list_checkpoints(vm.uri, vm.name)
