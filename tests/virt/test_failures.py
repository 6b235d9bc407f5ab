"""Failure paths: busy disks, failed/cancelled incrementals that must not advance the chain,
QEMU killed mid-backup."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import libvirt
import pytest

from app.virt import (
    BackupAborted,
    CheckpointBroken,
    DiskBusy,
    DomainNotFound,
    DomainStopped,
    VirtError,
    domain_state,
    list_checkpoints,
    run_backup,
)
from tests.virt import vmkit
from tests.virt.helpers import assert_same, big_vm, restore, store
from tests.virt.images import data_bytes, job_running
from tests.virt.vmkit import URI, MiB

BOTH = ["vda", "vdb"]


def test_missing_domain_disk_or_parent(vm: vmkit.VM, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    with pytest.raises(DomainNotFound):
        run_backup(URI, "ibp-test-nope", BOTH, scratch, "a", None)
    with pytest.raises(VirtError, match="has no disk vdz"):
        run_backup(URI, vm.name, ["vdz"], scratch, "a", None)
    with pytest.raises(CheckpointBroken, match="Parent checkpoint gone no longer exists"):
        run_backup(URI, vm.name, BOTH, scratch, "a", "gone")
    run_backup(URI, vm.name, BOTH, scratch, "a", None)
    with pytest.raises(VirtError, match="Checkpoint a already exists"):
        run_backup(URI, vm.name, BOTH, tmp_path / "other", "a", None)
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
                run_backup(URI, vm.name, BOTH, tmp_path / "scratch", "b", None)
            assert str(err.value) == "Disk vdb is busy with another block job"
            assert list_checkpoints(URI, vm.name) == []
            # The other disk alone is free.
            run_backup(URI, vm.name, ["vda"], tmp_path / "scratch", "b", None)
        finally:
            dom.blockJobAbort("vdb", 0)
    finally:
        conn.close()


def test_failed_incrementals_do_not_advance_the_chain(
    make_vm: vmkit.VMFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled or failed incrementals: the next one still has every change."""
    vm = make_vm("chain")
    storage = tmp_path / "storage"
    store(run_backup(URI, vm.name, BOTH, tmp_path / "scratch", "f0", None), storage, "f0", None)
    vmkit.write_pattern(vm.name, "vda", 0x31, 0, 48 * MiB)

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(BackupAborted):
        run_backup(URI, vm.name, BOTH, tmp_path / "scratch", "f1", "f0", cancel=cancel)
    assert list_checkpoints(URI, vm.name) == ["f0"]
    assert not list((tmp_path / "scratch").iterdir())

    vmkit.write_pattern(vm.name, "vdb", 0x32, 0, 1 * MiB)

    # A failure after the job succeeded (here: the target stays locked) also rolls back.
    def still_locked(path: Path, timeout: float = 10.0) -> None:
        raise VirtError(f"{path} is still locked by another process after 10s")

    monkeypatch.setattr("app.virt.backup.wait_unlocked", still_locked)
    with pytest.raises(VirtError, match="still locked"):
        run_backup(URI, vm.name, BOTH, tmp_path / "scratch", "f1", "f0")
    monkeypatch.undo()
    assert list_checkpoints(URI, vm.name) == ["f0"]
    assert not list((tmp_path / "scratch").iterdir())

    snaps = {t: vmkit.snapshot_disk(vm.name, t, tmp_path / f"{t}.raw") for t in BOTH}
    inc = {f.target: f for f in run_backup(URI, vm.name, BOTH, tmp_path / "scratch", "f1", "f0")}
    assert data_bytes(inc["vda"].path) == 48 * MiB
    assert data_bytes(inc["vdb"].path) == 1 * MiB
    store(list(inc.values()), storage, "f1", "f0")
    for t in BOTH:
        assert_same(restore(storage, ["f0", "f1"], t, tmp_path / "r"), snaps[t])


@pytest.mark.parametrize("seen", ["polling the job", "reading its outcome"])
def test_qemu_killed_during_a_backup(
    make_vm: vmkit.VMFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seen: str
) -> None:
    """QEMU SIGKILLed mid-job: the error speaks of the process, not of libvirt's job; nothing is
    left behind, and once the VM runs again a full backup with the same checkpoint name works.

    libvirt gives two accounts, depending on when the job is next looked at: a job query that
    fails ("domain is not running") or, once the job was seen to end, a cancelled job.
    """
    vm = big_vm(make_vm)
    scratch = tmp_path / "scratch"
    running = threading.Event()  # the job runs, slowed down so it surely still does at the kill
    killed = threading.Event()

    def progress(done: int, total: int) -> None:
        # Only once QEMU lists the job's block jobs can they be slowed: until then, try again at
        # the next poll (an unslowed job may finish before the kill, and the test proves nothing).
        if not running.is_set() and vmkit.throttle_block_jobs(vm.name, 1 * MiB) > 0:
            running.set()

    if seen == "reading its outcome":
        # The poll that would fail comes after the kill: the job is seen to end, not lost.
        def wait_past_the_kill(*args: object) -> None:
            deadline = time.monotonic() + 60
            while not running.is_set() and time.monotonic() < deadline:
                progress(0, 0)
                time.sleep(0.01)
            assert killed.wait(60)

        monkeypatch.setattr("app.virt.backup._wait", wait_past_the_kill)

    errors: list[BaseException] = []

    def backup() -> None:
        try:
            run_backup(URI, vm.name, BOTH, scratch, "q1", None, progress)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=backup)
    thread.start()
    try:
        assert running.wait(60), f"the backup job never ran: {errors}"
        vmkit.kill_qemu(vm.name)
    finally:
        killed.set()
        thread.join(120)
    assert not thread.is_alive()
    (err,) = errors
    assert isinstance(err, DomainStopped), repr(err)
    assert str(err) == "The VM's QEMU process stopped during the backup (libvirt state: shut off)"
    assert not list(scratch.iterdir())
    assert list_checkpoints(URI, vm.name) == []
    assert domain_state(URI, vm.name) == "shut off"
    monkeypatch.undo()

    vmkit.start_vm(vm.name)
    assert not job_running(URI, vm.name)
    full = {f.target: f for f in run_backup(URI, vm.name, BOTH, scratch, "q1", None)}
    assert data_bytes(full["vda"].path) == 1024 * MiB
    assert sorted(p.name for p in scratch.iterdir()) == ["q1-vda.qcow2", "q1-vdb.qcow2"]
    assert list_checkpoints(URI, vm.name) == ["q1"]
