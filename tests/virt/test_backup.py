"""Full and incremental push backups of real running VMs, restored and compared byte for byte."""

from __future__ import annotations

import threading
from pathlib import Path

import libvirt
import pytest

from app.virt import (
    BackupAborted,
    CheckpointBroken,
    DiskBusy,
    DomainNotFound,
    DomainNotRunning,
    ScratchFile,
    abort_job,
    check_image,
    delete_checkpoint,
    domain_state,
    image_info,
    list_checkpoints,
    list_disks,
    prune_checkpoints,
    run_backup,
)
from tests.virt import vmkit
from tests.virt.helpers import assert_same, big_vm, restore, store
from tests.virt.images import data_bytes, job_running
from tests.virt.vmkit import URI, MiB

BOTH = ["vda", "vdb"]


def _backup(
    vm: vmkit.VM,
    tmp: Path,
    checkpoint: str,
    parent: str | None,
    targets: list[str] = BOTH,
) -> list[ScratchFile]:
    return run_backup(URI, vm.name, targets, tmp / "scratch", checkpoint, parent)


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
        scratch = run_backup(
            URI,
            vm.name,
            BOTH,
            tmp_path / "scratch",
            name,
            parent,
            progress=lambda done, total: seen.append((done, total)),
        )
        assert [f.target for f in scratch] == BOTH
        for f in scratch:
            assert f.path == tmp_path / "scratch" / f"{name}-{f.target}.qcow2"
            assert f.size_bytes == f.path.stat().st_size > 0
            if parent is None:
                assert "backing-filename" not in image_info(f.path)
            else:  # docs/libvirt.md, pitfall 5: QEMU points an incremental at the live disk
                assert image_info(f.path)["backing-filename"] == str(vm.disk(f.target))
        store(scratch, storage, name, parent)
        chain.append(name)
        assert not list((tmp_path / "scratch").iterdir())
    assert list_checkpoints(URI, vm.name) == ["cp0", "cp1", "cp2"]
    assert seen and seen[-1][0] == seen[-1][1] > 0

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
    """A full backup's target is made by us with its tables in place (more than one here:
    one per 512 MiB); data on each side of their edges and at the very end comes back whole.
    """
    size = 3 * 1024 * MiB
    vm = make_vm("wide", [("vda", size)])
    for byte, offset in [(0x61, 0), (0x62, 512 * MiB - 64 * 1024), (0x63, 2 * 1024 * MiB)]:
        vmkit.write_pattern(vm.name, "vda", byte, offset, 128 * 1024)
    vmkit.write_pattern(vm.name, "vda", 0x64, size - MiB, MiB)
    snap = vmkit.snapshot_disk(vm.name, "vda", tmp_path / "at-backup.raw")
    (full,) = run_backup(URI, vm.name, ["vda"], tmp_path / "scratch", "wide-0", None)
    check_image(full.path)
    assert data_bytes(full.path) == 3 * 128 * 1024 + MiB
    store([full], tmp_path / "storage", "wide-0", None)
    assert_same(restore(tmp_path / "storage", ["wide-0"], "vda", tmp_path / "r"), snap)
    # The chain goes on from it as from any full.
    vmkit.write_pattern(vm.name, "vda", 0x65, 1024 * MiB, 64 * 1024)
    snap = vmkit.snapshot_disk(vm.name, "vda", tmp_path / "at-inc.raw")
    (inc,) = run_backup(URI, vm.name, ["vda"], tmp_path / "scratch", "wide-1", "wide-0")
    assert data_bytes(inc.path) == 64 * 1024
    store([inc], tmp_path / "storage", "wide-1", "wide-0")
    restored = restore(tmp_path / "storage", ["wide-0", "wide-1"], "vda", tmp_path / "r1")
    assert_same(restored, snap)


def test_selecting_only_vda_backs_up_only_vda(vm: vmkit.VM, tmp_path: Path) -> None:
    scratch = _backup(vm, tmp_path, "only-a", None, ["vda"])
    assert [f.target for f in scratch] == ["vda"]
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir()) == ["only-a-vda.qcow2"]
    # The checkpoint tracks vda only: an incremental of vdb from it is impossible.
    with pytest.raises(CheckpointBroken, match="does not track disk vdb"):
        _backup(vm, tmp_path, "only-b", "only-a", BOTH)
    assert list_checkpoints(URI, vm.name) == ["only-a"]
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir()) == ["only-a-vda.qcow2"]
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
    store(_backup(vm, tmp_path, "k0", None), storage, "k0", None)
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
    store(_backup(vm, tmp_path, "k2", None), storage, "k2", None)
    vmkit.write_pattern(vm.name, "vda", 0x68, 8 * MiB, 1 * MiB)
    snaps = {t: vmkit.snapshot_disk(vm.name, t, tmp_path / f"{t}.raw") for t in BOTH}
    inc = _backup(vm, tmp_path, "k3", "k2")
    assert data_bytes(next(f.path for f in inc if f.target == "vda")) == 1 * MiB
    store(inc, storage, "k3", "k2")
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


def test_cancel_aborts_and_leaves_nothing(make_vm: vmkit.VMFactory, tmp_path: Path) -> None:
    vm = big_vm(make_vm)
    cancel = threading.Event()
    cancel.set()  # checked before every poll: the job is aborted right after it started
    with pytest.raises(BackupAborted, match="cancelled"):
        run_backup(URI, vm.name, BOTH, tmp_path / "scratch", "x1", None, cancel=cancel)
    assert not list((tmp_path / "scratch").iterdir())
    assert list_checkpoints(URI, vm.name) == []
    assert not job_running(URI, vm.name)

    # Cancel from another thread while the job runs (slowed down so it surely still runs).
    cancel = threading.Event()
    calls: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        if not calls:
            vmkit.throttle_block_jobs(vm.name, 1 * MiB)
            threading.Timer(0.2, cancel.set).start()
        calls.append((done, total))

    try:
        run_backup(URI, vm.name, BOTH, tmp_path / "scratch", "x1", None, progress, cancel)
    except BackupAborted:
        assert calls[-1][0] < calls[-1][1] == 1024 * MiB + 32 * MiB
    else:  # pragma: no cover - the job beat the first poll on a loaded machine
        assert not calls or calls[-1][0] == calls[-1][1]
        delete_checkpoint(URI, vm.name, "x1")
        for f in (tmp_path / "scratch").iterdir():
            f.unlink()
    assert not list((tmp_path / "scratch").iterdir())
    assert list_checkpoints(URI, vm.name) == []

    with pytest.raises(BackupAborted, match="did not finish within 0s"):
        run_backup(URI, vm.name, BOTH, tmp_path / "scratch", "x1", None, timeout=0)
    assert not list((tmp_path / "scratch").iterdir())
    assert list_checkpoints(URI, vm.name) == []

    # The same checkpoint name works afterwards: nothing was left behind.
    done = run_backup(URI, vm.name, ["vdb"], tmp_path / "scratch", "x1", None)
    assert [f.target for f in done] == ["vdb"]
    assert list_checkpoints(URI, vm.name) == ["x1"]


def test_abort_job_of_an_orphaned_backup(make_vm: vmkit.VMFactory, tmp_path: Path) -> None:
    """A worker killed mid-backup leaves the job running: abort_job stops it."""
    vm = big_vm(make_vm)
    assert not job_running(URI, vm.name)
    assert abort_job(URI, vm.name) is False
    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName(vm.name)
        target = tmp_path / "orphan.qcow2"
        dom.backupBegin(
            f"<domainbackup mode='push'><disks><disk name='vda' type='file'>"
            f"<target file='{target}'/><driver type='qcow2'/></disk>"
            f"<disk name='vdb' backup='no'/></disks></domainbackup>",
            None,
            0,
        )
    finally:
        conn.close()
    assert vmkit.throttle_block_jobs(vm.name, 1 * MiB) == 1
    assert job_running(URI, vm.name)
    with pytest.raises(DiskBusy, match="Disk vda is busy"):
        _backup(vm, tmp_path, "while-orphan", None)
    assert abort_job(URI, vm.name) is True
    assert not job_running(URI, vm.name)
    assert not target.exists()  # docs/libvirt.md, pitfall 6: a cancelled push deletes its target


def test_parallel_backups_of_two_vms(make_vm: vmkit.VMFactory, tmp_path: Path) -> None:
    """Blocking calls from worker threads (as asyncio.to_thread does) do not interfere."""
    from concurrent.futures import ThreadPoolExecutor

    vms = [make_vm(f"par{i}") for i in range(2)]
    for i, v in enumerate(vms):
        vmkit.write_pattern(v.name, "vda", 0x40 + i, 0, 2 * MiB)

    def chain(v: vmkit.VM) -> int:
        scratch = tmp_path / v.name
        run_backup(URI, v.name, BOTH, scratch, "p0", None)
        vmkit.write_pattern(v.name, "vdb", 0x50, 0, 1 * MiB)
        inc = run_backup(URI, v.name, BOTH, scratch, "p1", "p0")
        return sum(data_bytes(f.path) for f in inc)

    with ThreadPoolExecutor(max_workers=2) as pool:
        assert list(pool.map(chain, vms)) == [1 * MiB, 1 * MiB]
    for v in vms:
        assert list_checkpoints(URI, v.name) == ["p0", "p1"]
