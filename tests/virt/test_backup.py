"""Full and incremental pull-mode backups of real running VMs, streamed as qcow2 files, restored
and compared byte for byte."""

from __future__ import annotations

import asyncio
from pathlib import Path

import libvirt
import pytest

from app.virt import (
    CheckpointBroken,
    DiskBusy,
    DomainNotFound,
    DomainNotRunning,
    abort_job,
    check_image,
    delete_checkpoint,
    domain_state,
    image_info,
    list_checkpoints,
    list_disks,
    prune_checkpoints,
    pull_backup,
)
from app.virt.backup import begin_pull
from tests.virt import vmkit
from tests.virt.helpers import Stored, assert_same, back_up, big_vm, restore
from tests.virt.images import data_bytes, job_running
from tests.virt.vmkit import URI, MiB

BOTH = ["vda", "vdb"]


def _backup(
    vm: vmkit.VM,
    tmp: Path,
    checkpoint: str,
    parent: str | None,
    targets: list[str] = BOTH,
) -> list[Stored]:
    return back_up(vm.name, targets, tmp, checkpoint, parent)


def test_list_disks_and_state(vm: vmkit.VM) -> None:
    disks = list_disks(URI, vm.name)
    assert [(d.target, d.boot, d.size_bytes, d.format) for d in disks] == [
        ("vda", True, 64 * MiB, "qcow2"),
        ("vdb", False, 32 * MiB, "qcow2"),
    ]
    assert disks[0].source == str(vm.disk("vda"))
    assert domain_state(URI, vm.name) == "running"
    with pytest.raises(DomainNotFound):
        domain_state(URI, "ibp-test-does-not-exist")
    with pytest.raises(DomainNotFound):
        list_disks(URI, "ibp-test-does-not-exist")


def test_full_then_incrementals_restore_every_point(vm: vmkit.VM, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    writes = [
        # (target, byte, offset, length) before each backup point
        [("vda", 0x11, 0, 4 * MiB), ("vdb", 0x22, 1 * MiB, 2 * MiB)],
        [
            ("vda", 0xAB, 0, 1 * MiB),
            ("vda", 0xAC, 40 * MiB, 512 * 1024),
            ("vdb", 0x33, 0, 64 * 1024),
        ],
        [("vda", 0xCD, 63 * MiB, 1 * MiB), ("vdb", 0x44, 31 * MiB, 1 * MiB)],
    ]
    chain: list[str] = []
    seen: list[tuple[int, int]] = []
    for point, point_writes in enumerate(writes):
        for target, byte, offset, length in point_writes:
            vmkit.write_pattern(vm.name, target, byte, offset, length)
        for target in BOTH:
            vmkit.snapshot_disk(vm.name, target, snaps / f"{point}-{target}.raw")
        name = f"cp{point}"
        parent = chain[-1] if chain else None
        stored = back_up(
            vm.name,
            BOTH,
            tmp_path,
            name,
            parent,
            lambda sent, planned: seen.append((sent, planned)),
        )
        assert [f.target for f in stored] == BOTH
        for f in stored:
            assert f.path == storage / name / f"{f.target}.qcow2"
            check_image(f.path)
            if parent is None:
                assert "backing-filename" not in image_info(f.path)
            else:  # the parent's stored file, relative: the chain opens where it lies
                info = image_info(f.path)
                assert info["backing-filename"] == f"../{parent}/{f.target}.qcow2"
                assert info["backing-filename-format"] == "qcow2"
        chain.append(name)
        assert seen[-1] == (sum(f.size_bytes for f in stored),) * 2
        assert not list((tmp_path / "scratch").iterdir())
    assert list_checkpoints(URI, vm.name) == ["cp0", "cp1", "cp2"]
    assert all(sent <= planned for sent, planned in seen)

    for point in range(len(writes)):
        for target in BOTH:
            restored = restore(storage, chain[: point + 1], target, tmp_path / f"r{point}")
            check_image(restored)
            assert "backing-filename" not in image_info(restored)
            assert_same(restored, snaps / f"{point}-{target}.raw")
    # Stored layout is usable as is: relative backing names resolve inside storage/.
    assert_same(storage / "cp2" / "vda.qcow2", snaps / "2-vda.raw")


def test_full_backup_of_a_disk_larger_than_its_first_l2_tables(
    make_vm: vmkit.VMFactory, tmp_path: Path
) -> None:
    """More than one L2 table (one per 512 MiB of disk): data on each side of their edges and
    at the very end comes back whole, and only the data is stored."""
    size = 3 * 1024 * MiB
    vm = make_vm("wide", [("vda", size)])
    for byte, offset in [(0x61, 0), (0x62, 512 * MiB - 64 * 1024), (0x63, 2 * 1024 * MiB)]:
        vmkit.write_pattern(vm.name, "vda", byte, offset, 128 * 1024)
    vmkit.write_pattern(vm.name, "vda", 0x64, size - MiB, MiB)
    snap = vmkit.snapshot_disk(vm.name, "vda", tmp_path / "at-backup.raw")
    (full,) = back_up(vm.name, ["vda"], tmp_path, "wide-0", None)
    check_image(full.path)
    assert data_bytes(full.path) == 3 * 128 * 1024 + MiB
    assert_same(restore(tmp_path / "storage", ["wide-0"], "vda", tmp_path / "r"), snap)
    # The chain goes on from it as from any full.
    vmkit.write_pattern(vm.name, "vda", 0x65, 1024 * MiB, 64 * 1024)
    snap = vmkit.snapshot_disk(vm.name, "vda", tmp_path / "at-inc.raw")
    (inc,) = back_up(vm.name, ["vda"], tmp_path, "wide-1", "wide-0")
    assert data_bytes(inc.path) == 64 * 1024
    restored = restore(tmp_path / "storage", ["wide-0", "wide-1"], "vda", tmp_path / "r1")
    assert_same(restored, snap)


def test_selecting_only_vda_backs_up_only_vda(vm: vmkit.VM, tmp_path: Path) -> None:
    stored = _backup(vm, tmp_path, "only-a", None, ["vda"])
    assert [f.target for f in stored] == ["vda"]
    assert not list((tmp_path / "scratch").iterdir())
    # The checkpoint tracks vda only: an incremental of vdb from it is impossible.
    with pytest.raises(CheckpointBroken, match="does not track disk vdb"):
        _backup(vm, tmp_path, "only-b", "only-a", BOTH)
    assert list_checkpoints(URI, vm.name) == ["only-a"]
    assert not list((tmp_path / "scratch").iterdir())
    inc = _backup(vm, tmp_path, "only-c", "only-a", ["vda"])
    assert [f.target for f in inc] == ["vda"]


def test_incremental_holds_only_the_written_bytes(vm: vmkit.VM, tmp_path: Path) -> None:
    _backup(vm, tmp_path, "base", None)
    vmkit.write_pattern(vm.name, "vda", 0x5A, 0, 1 * MiB)
    vmkit.write_pattern(vm.name, "vda", 0x5B, 20 * MiB, 512 * 1024)
    inc = {f.target: f for f in _backup(vm, tmp_path, "inc", "base")}
    written = 1 * MiB + 512 * 1024
    assert data_bytes(inc["vda"].path) == written
    assert inc["vda"].size_bytes < written + 1 * MiB  # data + qcow2 metadata, not 64 MiB
    assert data_bytes(inc["vdb"].path) == 0
    assert inc["vdb"].size_bytes < 1 * MiB


def test_not_running_instances_are_refused(make_vm: vmkit.VMFactory, tmp_path: Path) -> None:
    vm = make_vm("paused")
    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName(vm.name)
        dom.suspend()
        assert domain_state(URI, vm.name) == "paused"
        with pytest.raises(DomainNotRunning) as err:
            _backup(vm, tmp_path, "p", None)
        assert str(err.value) == "Instance is not running (libvirt state: paused)"
        dom.destroy()
    finally:
        conn.close()
    with pytest.raises(DomainNotRunning) as err:
        _backup(vm, tmp_path, "p", None)
    assert str(err.value) == "Instance is not running (libvirt state: shut off)"
    assert list_checkpoints(URI, vm.name) == []
    assert not (tmp_path / "scratch").exists() or not list((tmp_path / "scratch").iterdir())

    never_started = make_vm("off", start=False)
    with pytest.raises(
        DomainNotRunning, match=r"^Instance is not running \(libvirt state: shut off\)$"
    ):
        _backup(never_started, tmp_path, "p", None)


def test_killed_qemu_breaks_the_chain_and_reset_recovers(vm: vmkit.VM, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    _backup(vm, tmp_path, "k0", None)
    vmkit.write_pattern(vm.name, "vda", 0x66, 0, 1 * MiB)
    vmkit.kill_qemu(vm.name)
    assert domain_state(URI, vm.name) in ("shut off", "crashed")
    vmkit.start_vm(vm.name)
    vmkit.write_pattern(vm.name, "vdb", 0x67, 0, 1 * MiB)

    with pytest.raises(CheckpointBroken, match="missing or broken bitmap"):
        _backup(vm, tmp_path, "k1", "k0")
    assert list_checkpoints(URI, vm.name) == ["k0"]  # the failed backup created none
    assert not list((tmp_path / "scratch").iterdir())

    from app.virt import reset_checkpoints

    reset_checkpoints(URI, vm.name)
    assert list_checkpoints(URI, vm.name) == []
    _backup(vm, tmp_path, "k2", None)
    vmkit.write_pattern(vm.name, "vda", 0x68, 8 * MiB, 1 * MiB)
    snaps = {t: vmkit.snapshot_disk(vm.name, t, tmp_path / f"{t}.raw") for t in BOTH}
    inc = _backup(vm, tmp_path, "k3", "k2")
    assert data_bytes(next(f.path for f in inc if f.target == "vda")) == 1 * MiB
    for t in BOTH:
        assert_same(restore(storage, ["k2", "k3"], t, tmp_path / "r"), snaps[t])


def test_prune_keeps_only_what_is_asked(vm: vmkit.VM, tmp_path: Path) -> None:
    parent = None
    for i in range(4):
        vmkit.write_pattern(vm.name, "vda", 0x70 + i, i * MiB, 64 * 1024)
        _backup(vm, tmp_path, f"c{i}", parent)
        parent = f"c{i}"
    assert list_checkpoints(URI, vm.name) == ["c0", "c1", "c2", "c3"]
    assert prune_checkpoints(URI, vm.name, keep={"c2", "c3", "unknown"}) == ["c0", "c1"]
    assert list_checkpoints(URI, vm.name) == ["c2", "c3"]
    assert prune_checkpoints(URI, vm.name, keep=["c2", "c3"]) == []
    delete_checkpoint(URI, vm.name, "c0")  # already gone: no error
    # The kept bitmaps still work: an incremental from c2 holds c2's and c3's changes.
    vmkit.write_pattern(vm.name, "vda", 0x7F, 10 * MiB, 64 * 1024)
    inc = {f.target: f for f in _backup(vm, tmp_path, "c4", "c2")}
    assert data_bytes(inc["vda"].path) == 2 * 64 * 1024
    assert prune_checkpoints(URI, vm.name, keep=[]) == ["c2", "c3", "c4"]


async def test_cancel_aborts_and_leaves_nothing(make_vm: vmkit.VMFactory, tmp_path: Path) -> None:
    vm = big_vm(make_vm)
    scratch = tmp_path / "scratch"
    streaming = asyncio.Event()

    async def backup() -> None:
        async with pull_backup(URI, vm.name, BOTH, scratch, "x1", None, {}) as pull:
            async for _chunk in pull.stream(pull.disks[0]):
                streaming.set()
                await asyncio.sleep(0.01)

    task = asyncio.create_task(backup())
    await asyncio.wait_for(streaming.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not list(scratch.iterdir())
    assert list_checkpoints(URI, vm.name) == []
    assert not job_running(URI, vm.name)

    # The same checkpoint name works afterwards: nothing was left behind.
    done = await asyncio.to_thread(back_up, vm.name, ["vdb"], tmp_path, "x1", None)
    assert [f.target for f in done] == ["vdb"]
    assert list_checkpoints(URI, vm.name) == ["x1"]


def test_abort_job_of_an_orphaned_backup(make_vm: vmkit.VMFactory, tmp_path: Path) -> None:
    """A worker killed mid-backup leaves the job running: abort_job stops it."""
    vm = big_vm(make_vm)
    assert not job_running(URI, vm.name)
    assert abort_job(URI, vm.name) is False
    begin_pull(URI, vm.name, ["vda"], tmp_path / "scratch", "orphan", None)  # then "killed"
    assert job_running(URI, vm.name)
    with pytest.raises(DiskBusy, match="Disk vda is busy"):
        _backup(vm, tmp_path, "while-orphan", None)
    assert abort_job(URI, vm.name) is True
    assert not job_running(URI, vm.name)


def test_parallel_backups_of_two_vms(make_vm: vmkit.VMFactory, tmp_path: Path) -> None:
    """Blocking calls from worker threads (as asyncio.to_thread does) do not interfere."""
    from concurrent.futures import ThreadPoolExecutor

    vms = [make_vm(f"par{i}") for i in range(2)]
    for i, v in enumerate(vms):
        vmkit.write_pattern(v.name, "vda", 0x40 + i, 0, 2 * MiB)

    def chain(v: vmkit.VM) -> int:
        back_up(v.name, BOTH, tmp_path / v.name, "p0", None)
        vmkit.write_pattern(v.name, "vdb", 0x50, 0, 1 * MiB)
        inc = back_up(v.name, BOTH, tmp_path / v.name, "p1", "p0")
        return sum(data_bytes(f.path) for f in inc)

    with ThreadPoolExecutor(max_workers=2) as pool:
        assert list(pool.map(chain, vms)) == [1 * MiB, 1 * MiB]
    for v in vms:
        assert list_checkpoints(URI, v.name) == ["p0", "p1"]


async def test_a_backup_holds_the_disk_as_it_was_when_it_began(
    make_vm: vmkit.VMFactory, tmp_path: Path
) -> None:
    """Point in time under load: pattern A everywhere; while the full streams, the guest
    overwrites all of it with pattern B (half before the first read, half once half the image
    is sent). The backup holds only A; the disk holds only B."""
    size = 128 * MiB
    vm = make_vm("pit", [("vda", size)], start=False)
    vmkit.fill_disk(vm.disk("vda"), 0xAA, size)
    vmkit.start_vm(vm.name)
    before = vmkit.snapshot_disk(vm.name, "vda", tmp_path / "a.raw")
    out = tmp_path / "full.qcow2"
    rewritten = False
    async with pull_backup(URI, vm.name, ["vda"], tmp_path / "scratch", "pit", None, {}) as pull:
        (disk,) = pull.disks
        await asyncio.to_thread(vmkit.write_pattern, vm.name, "vda", 0xBB, 0, size // 2)
        with open(out, "wb") as f:
            async for chunk in pull.stream(disk):
                f.write(chunk)
                if not rewritten and pull.sent > disk.layout.size // 2:
                    await asyncio.to_thread(
                        vmkit.write_pattern, vm.name, "vda", 0xBB, size // 2, size // 2
                    )
                    rewritten = True
    assert rewritten
    check_image(out)
    assert_same(out, before)
    after = vmkit.snapshot_disk(vm.name, "vda", tmp_path / "b.raw")
    assert after.read_bytes() == b"\xbb" * size
