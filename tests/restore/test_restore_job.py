"""The restore and verify jobs on a real QEMU VM, from local storage and from real S3."""

from __future__ import annotations

import uuid
from pathlib import Path

from sqlalchemy import update

from app import virt
from app.models import Backup, BackupChain, BackupPolicy, BackupStorage, Restore
from app.security import secret_box
from app.storage.base import iter_file
from app.storage.registry import get_driver
from tests.restore.helpers import (
    DISKS,
    Maker,
    files_of,
    restore,
    set_instance_status,
    snap,
    stop_vm,
    take_backup,
    verify,
)
from tests.storage.servers import Server
from tests.virt import vmkit
from tests.virt.images import compare_images
from tests.virt.vmkit import MiB
from tests.worker.conftest import World
from worker.jobs import JobContext


async def _chain(
    ctx: JobContext, maker: Maker, world: World, tmp_path: Path, incrementals: int
) -> list[tuple[Backup, dict[str, Path]]]:
    """A full and N incrementals, with each disk's content saved at every point."""
    vm = world.vm
    vmkit.write_pattern(vm.name, "vda", 0x11, 0, 8 * MiB)
    vmkit.write_pattern(vm.name, "vdb", 0x22, 2 * MiB, MiB)
    points = [(await take_backup(ctx, maker, world, "full"), snap(vm, tmp_path, "p0"))]
    for i in range(incrementals):
        vmkit.write_pattern(vm.name, "vda", 0x30 + i, (4 + 9 * i) * MiB, MiB + 64 * 1024)
        vmkit.write_pattern(vm.name, "vdb", 0x40 + i, (1 + 5 * i) * MiB, 512 * 1024)
        expected = snap(vm, tmp_path, f"p{i + 1}")
        points.append((await take_backup(ctx, maker, world, "incremental"), expected))
    for backup, _ in points:
        assert backup.status == "completed", backup.error
    assert [b.type for b, _ in points] == ["full"] + ["incremental"] * incrementals
    return points


async def _restore_every_point(
    ctx: JobContext, maker: Maker, world: World, points: list[tuple[Backup, dict[str, Path]]]
) -> None:
    for backup, expected in points:
        done = await restore(ctx, maker, world, backup.id, "new_disk")
        assert done.status == "completed", done.error
        assert done.progress == 100 and set(done.result) == set(DISKS)
        for target in DISKS:
            out = Path(done.result[target])
            assert out.parent == world.vm.disk(target).parent
            assert out.name == f"{world.vm.name}-{target}-restore-{done.id.hex[:8]}.qcow2"
            virt.check_image(out)
            assert virt.image_info(out).get("backing-filename") is None  # standalone
            assert compare_images(out, expected[target]), f"{backup.type} {target} differs"
            out.unlink()
    scratch = Path(world.hypervisor.scratch_dir)
    assert not scratch.exists() or not list(scratch.iterdir()), "work files left behind"


async def _move_to_s3(maker: Maker, world: World, server: Server, backups: list[Backup]) -> None:
    """Upload every stored file through the S3 driver and point the catalog at that storage."""
    config = dict(server.config, prefix=f"t-{uuid.uuid4().hex[:6]}/")
    driver = get_driver("s3", config)
    try:
        for backup in backups:
            for f in (await files_of(maker, backup.id)).values():
                path = world.storage_dir / f.object_key
                result = await driver.put(f.object_key, iter_file(path), path.stat().st_size)
                assert result.sha256 == f.sha256
    finally:
        await driver.close()
    secret = {"secret_access_key": config.pop("secret_access_key")}
    async with maker() as session:
        storage = BackupStorage(
            id=uuid.uuid4(),
            name=f"s3-{uuid.uuid4().hex[:6]}",
            kind="s3",
            config=config,
            secrets_encrypted=secret_box().encrypt(secret),
            status="unknown",
        )
        session.add(storage)
        await session.flush()
        ids = [b.id for b in backups]
        await session.execute(
            update(Backup).where(Backup.id.in_(ids)).values(storage_id=storage.id)
        )
        chain_ids = {b.chain_id for b in backups}
        await session.execute(
            update(BackupChain).where(BackupChain.id.in_(chain_ids)).values(storage_id=storage.id)
        )
        await session.commit()
    # Nothing is read from the local copy any more.
    for backup in backups:
        for f in (await files_of(maker, backup.id)).values():
            (world.storage_dir / f.object_key).unlink()


async def test_every_point_of_a_chain_restores_from_local_storage_and_from_s3(
    world: World,
    worker_ctx: JobContext,
    real_sessionmaker: Maker,
    tmp_path: Path,
    s3_server: Server,
) -> None:
    points = await _chain(worker_ctx, real_sessionmaker, world, tmp_path, incrementals=3)
    await _restore_every_point(worker_ctx, real_sessionmaker, world, points)
    await _move_to_s3(real_sessionmaker, world, s3_server, [b for b, _ in points])
    await _restore_every_point(worker_ctx, real_sessionmaker, world, points)


async def test_in_place_restore_of_a_stopped_vm_then_the_next_backup_is_a_full(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker, tmp_path: Path
) -> None:
    maker, vm = real_sessionmaker, world.vm
    points = await _chain(worker_ctx, maker, world, tmp_path, incrementals=2)
    chosen, expected = points[1]
    vmkit.write_pattern(vm.name, "vda", 0x77, 0, 4 * MiB)  # after the chain: must be undone
    stop_vm(vm)
    await set_instance_status(maker, world, "stopped")
    disk_before = {t: vm.disk(t).stat().st_ino for t in DISKS}

    done = await restore(worker_ctx, maker, world, chosen.id, "in_place")
    assert done.status == "completed", done.error
    assert done.result == {t: str(vm.disk(t)) for t in DISKS}
    assert {t: vm.disk(t).stat().st_ino for t in DISKS} != disk_before  # replaced, not patched
    assert not [p for p in vm.disk("vda").parent.iterdir() if p.name.startswith(".")]
    assert virt.list_checkpoints(vm.uri, vm.name) == []

    vmkit.start_vm(vm.name)
    after = snap(vm, tmp_path, "after")
    for target in DISKS:
        assert compare_images(after[target], expected[target]), target

    await set_instance_status(maker, world, "deployed")
    nxt = await take_backup(worker_ctx, maker, world, "incremental")
    assert nxt.status == "completed", nxt.error
    assert nxt.type == "full" and nxt.chain_id != chosen.chain_id
    assert nxt.chain_reset_reason == "instance was restored from a backup"
    # ...and the chain goes on normally from there.
    vmkit.write_pattern(vm.name, "vdb", 0x78, 0, MiB)
    inc = await take_backup(worker_ctx, maker, world, "incremental")
    assert inc.type == "incremental" and inc.parent_id == nxt.id, inc.error


async def test_in_place_restore_fails_when_libvirt_says_running_and_leaves_the_disk(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker, tmp_path: Path
) -> None:
    maker, vm = real_sessionmaker, world.vm
    full = await take_backup(worker_ctx, maker, world, "full")
    vmkit.write_pattern(vm.name, "vda", 0x5A, 0, 2 * MiB)
    before = snap(vm, tmp_path, "before")
    await set_instance_status(maker, world, "stopped")  # the catalog is wrong: it runs

    done = await restore(worker_ctx, maker, world, full.id, "in_place")
    assert done.status == "failed"
    assert done.error == (
        "Instance must be shut off for an in-place restore (libvirt state: running); "
        "its disks were not changed"
    )
    after = snap(vm, tmp_path, "after")
    for target in DISKS:
        assert compare_images(after[target], before[target]), target


async def test_tampered_or_missing_stored_files_fail_before_touching_the_instance(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker, tmp_path: Path
) -> None:
    maker, vm = real_sessionmaker, world.vm
    points = await _chain(worker_ctx, maker, world, tmp_path, incrementals=1)
    (full, _), (inc, _) = points
    good = await verify(worker_ctx, maker, inc.id)
    assert good.verify_ok is True and good.verify_error is None and good.verified_at is not None

    stop_vm(vm)
    await set_instance_status(maker, world, "stopped")
    before = snap(vm, tmp_path, "before")

    # Flip bytes in the middle of the full's vda on storage.
    stored = world.storage_dir / (await files_of(maker, full.id))["vda"].object_key
    original = stored.read_bytes()
    middle = len(original) // 2
    with stored.open("r+b") as f:
        f.seek(middle)
        f.write(bytes(b ^ 0xFF for b in original[middle : middle + 4096]))
    when = full.created_at.strftime("%Y-%m-%d %H:%M UTC")
    corrupt = f"vda of full {full.id} ({when}): sha256 mismatch: the stored file is corrupt"

    done = await restore(worker_ctx, maker, world, inc.id, "in_place")
    assert done.status == "failed" and done.error == corrupt
    bad = await verify(worker_ctx, maker, inc.id)
    assert bad.verify_ok is False and bad.verify_error == corrupt
    culprit = await verify(worker_ctx, maker, full.id)
    assert culprit.verify_ok is False and culprit.verify_error == corrupt

    stored.write_bytes(original)
    vdb = world.storage_dir / (await files_of(maker, inc.id))["vdb"].object_key
    vdb.unlink()
    when = inc.created_at.strftime("%Y-%m-%d %H:%M UTC")
    missing = f"vdb of incremental {inc.id} ({when}) is missing from storage"
    done = await restore(worker_ctx, maker, world, inc.id, "new_disk")
    assert done.status == "failed" and done.error == missing
    assert not [p for p in vm.disk("vda").parent.iterdir() if "restore" in p.name]
    bad = await verify(worker_ctx, maker, inc.id)
    assert bad.verify_ok is False and bad.verify_error == missing
    assert (await verify(worker_ctx, maker, full.id)).verify_ok is True

    after = snap(vm, tmp_path, "after")
    for target in DISKS:
        assert compare_images(after[target], before[target]), target
    scratch = Path(world.hypervisor.scratch_dir)
    assert not scratch.exists() or not list(scratch.iterdir()), "work files left behind"


async def test_a_backup_does_not_start_while_a_restore_runs(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker
) -> None:
    maker = real_sessionmaker
    async with maker() as session:
        session.add(
            Restore(
                id=uuid.uuid4(),
                instance_id=world.instance.id,
                target="new_disk",
                status="in_progress",
                result={},
            )
        )
        await session.commit()
    refused = await take_backup(worker_ctx, maker, world, "full")
    assert refused.status == "failed"
    assert refused.error == "A restore of this instance is in progress"
    async with maker() as session:
        policy = await session.get(BackupPolicy, world.policy.id)
        assert policy is not None and policy.status == "error"
