"""Failure paths: busy disks, failed/cancelled incrementals that must not advance the chain,
QEMU killed mid-stream."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from app.virt import (
    CheckpointBroken,
    DiskBusy,
    DomainNotFound,
    DomainStopped,
    ScratchFull,
    VirtError,
    domain_state,
    list_checkpoints,
    pull_backup,
)
from tests.virt import vmkit
from tests.virt.helpers import assert_same, back_up, big_vm, restore
from tests.virt.images import data_bytes, job_running
from tests.virt.vmkit import URI, MiB

BOTH = ["vda", "vdb"]


def test_missing_domain_disk_or_parent(vm: vmkit.VM, tmp_path: Path) -> None:
    with pytest.raises(DomainNotFound):
        back_up("ibp-test-nope", BOTH, tmp_path, "a", None)
    with pytest.raises(VirtError, match="has no disk vdz"):
        back_up(vm.name, ["vdz"], tmp_path, "a", None)
    with pytest.raises(CheckpointBroken, match="Parent checkpoint gone no longer exists"):
        back_up(vm.name, BOTH, tmp_path, "a", "gone")
    back_up(vm.name, BOTH, tmp_path, "a", None)
    with pytest.raises(VirtError, match="Checkpoint a already exists"):
        back_up(vm.name, BOTH, tmp_path / "other", "a", None)
    assert list_checkpoints(URI, vm.name) == ["a"]
    long = tmp_path / ("x" * 80)
    with pytest.raises(VirtError, match="too long a path for the backup's NBD socket"):
        back_up(vm.name, BOTH, long, "b", None)
    assert list_checkpoints(URI, vm.name) == ["a"]


def test_disk_with_a_block_job_is_busy(vm: vmkit.VM, tmp_path: Path) -> None:
    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName(vm.name)
        copy = tmp_path / "mirror.qcow2"
        dom.blockCopy(
            "vdb",
            f"<disk type='file'><source file='{copy}'/><driver type='qcow2'/></disk>",
            None,
            libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB,
        )
        try:
            with pytest.raises(DiskBusy) as err:
                back_up(vm.name, BOTH, tmp_path, "b", None)
            assert str(err.value) == "Disk vdb is busy with another block job"
            assert list_checkpoints(URI, vm.name) == []
            # The other disk alone is free.
            back_up(vm.name, ["vda"], tmp_path, "b", None)
        finally:
            dom.blockJobAbort("vdb", 0)
    finally:
        conn.close()


async def _fail_mid_stream(
    domain: str, tmp: Path, checkpoint: str, parent: str | None, fail: BaseException | None
) -> None:
    """Start a backup and stop reading after its first chunk: raise ``fail`` there, or (None)
    be cancelled."""
    backing = {t: f"../{parent}/{t}.qcow2" for t in BOTH} if parent else {}

    async def backup() -> None:
        async with pull_backup(
            URI, domain, BOTH, tmp / "scratch", checkpoint, parent, backing
        ) as pull:
            async for _chunk in pull.stream(pull.disks[0]):
                if fail is not None:
                    raise fail
                await asyncio.sleep(3600)

    task = asyncio.create_task(backup())
    if fail is None:
        await asyncio.sleep(0.5)
        task.cancel()
    await task


async def test_failed_incrementals_do_not_advance_the_chain(
    make_vm: vmkit.VMFactory, tmp_path: Path
) -> None:
    """Cancelled or failed incrementals: the next one still has every change."""
    vm = make_vm("chain")
    storage = tmp_path / "storage"
    await asyncio.to_thread(back_up, vm.name, BOTH, tmp_path, "f0", None)
    vmkit.write_pattern(vm.name, "vda", 0x31, 0, 48 * MiB)

    with pytest.raises(asyncio.CancelledError):
        await _fail_mid_stream(vm.name, tmp_path, "f1", "f0", None)
    assert list_checkpoints(URI, vm.name) == ["f0"]
    assert not list((tmp_path / "scratch").iterdir())

    vmkit.write_pattern(vm.name, "vdb", 0x32, 0, 1 * MiB)

    # The storage failing mid-stream also rolls back.
    with pytest.raises(OSError, match="storage went away"):
        await _fail_mid_stream(vm.name, tmp_path, "f1", "f0", OSError("storage went away"))
    assert list_checkpoints(URI, vm.name) == ["f0"]
    assert not list((tmp_path / "scratch").iterdir())
    assert not job_running(URI, vm.name)

    snaps = {t: vmkit.snapshot_disk(vm.name, t, tmp_path / f"{t}.raw") for t in BOTH}
    stored = await asyncio.to_thread(back_up, vm.name, BOTH, tmp_path, "f1", "f0")
    inc = {f.target: f for f in stored}
    assert data_bytes(inc["vda"].path) == 48 * MiB
    assert data_bytes(inc["vdb"].path) == 1 * MiB
    for t in BOTH:
        assert_same(restore(storage, ["f0", "f1"], t, tmp_path / "r"), snaps[t])


async def test_qemu_killed_during_a_backup(make_vm: vmkit.VMFactory, tmp_path: Path) -> None:
    """QEMU SIGKILLed mid-stream: the error speaks of the process, not of the NBD connection;
    nothing is left behind, and once the VM runs again a full backup with the same checkpoint
    name works."""
    vm = big_vm(make_vm)
    scratch = tmp_path / "scratch"
    killed = False
    with pytest.raises(DomainStopped) as err:
        async with pull_backup(URI, vm.name, BOTH, scratch, "q1", None, {}) as pull:
            async for _chunk in pull.stream(pull.disks[0]):
                if not killed and pull.sent >= 16 * MiB:
                    await asyncio.to_thread(vmkit.kill_qemu, vm.name)
                    killed = True
    assert str(err.value) == (
        "The VM's QEMU process stopped during the backup (libvirt state: shut off)"
    )
    assert not list(scratch.iterdir())
    assert list_checkpoints(URI, vm.name) == []
    assert domain_state(URI, vm.name) == "shut off"

    vmkit.start_vm(vm.name)
    assert not job_running(URI, vm.name)
    stored = await asyncio.to_thread(back_up, vm.name, BOTH, tmp_path, "q1", None)
    full = {f.target: f for f in stored}
    assert data_bytes(full["vda"].path) == 1024 * MiB
    assert not list(scratch.iterdir())
    assert list_checkpoints(URI, vm.name) == ["q1"]


@pytest.fixture
def small_scratch(tmp_path: Path) -> Iterator[Path]:
    """A scratch folder on a 64 MiB filesystem of its own, which a guest can fill."""
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


async def test_a_guest_writing_more_than_the_scratch_holds_never_sees_it(
    make_vm: vmkit.VMFactory, tmp_path: Path, small_scratch: Path
) -> None:
    """During the backup the guest overwrites 80 MiB, whose old data would need 80 MiB of
    copy-before-write scratch; the folder has 64 MiB. The job is stopped while room is left:
    the backup fails saying so, the VM runs on (not paused), and every write it made is on its
    disk (docs/libvirt.md, pitfall 15)."""
    size = 96 * MiB
    vm = make_vm("cbw", [("vda", size)], start=False)
    vmkit.fill_disk(vm.disk("vda"), 0xAA, size)
    vmkit.start_vm(vm.name)
    with pytest.raises(ScratchFull, match="wrote more during the backup than the scratch"):
        async with pull_backup(
            URI, vm.name, ["vda"], small_scratch, "cbw", None, {}, reserve=24 * MiB
        ) as pull:
            for step in range(80):
                await asyncio.to_thread(vmkit.write_pattern, vm.name, "vda", 0xBB, step * MiB, MiB)
            async for _chunk in pull.stream(pull.disks[0]):
                pass
    assert domain_state(URI, vm.name) == "running"
    disk = vmkit.snapshot_disk(vm.name, "vda", tmp_path / "after.raw").read_bytes()
    assert disk == b"\xbb" * (80 * MiB) + b"\xaa" * (16 * MiB)
    assert list_checkpoints(URI, vm.name) == []
    assert not list(small_scratch.iterdir())
    assert not job_running(URI, vm.name)

    # Too little room to begin with: refused before any job starts.
    with pytest.raises(ScratchFull, match="a backup starts with at least"):
        async with pull_backup(
            URI, vm.name, ["vda"], small_scratch, "cbw", None, {}, reserve=40 * MiB
        ):
            pass
    assert not job_running(URI, vm.name)
    assert list_checkpoints(URI, vm.name) == []
