"""Helpers shared by the virt tests: a VM with data, fake storage layout, restore and compare."""

from __future__ import annotations

import shutil
from pathlib import Path

from app.virt import ScratchFile, rebase_onto
from tests.virt import vmkit
from tests.virt.images import compare_images, rebuild_chain
from tests.virt.vmkit import MiB


def store(scratch: list[ScratchFile], storage: Path, backup: str, parent: str | None) -> None:
    """Store scratch files like the backup job does: storage/<backup>/<target>.qcow2.

    An incremental is first rebased onto its parent's stored name (docs/libvirt.md, pitfall 5).
    """
    (storage / backup).mkdir(parents=True, exist_ok=True)
    for f in scratch:
        if parent is not None:
            rebase_onto(f.path, f"../{parent}/{f.target}.qcow2")
        shutil.move(f.path, storage / backup / f"{f.target}.qcow2")


def restore(storage: Path, chain: list[str], target: str, workdir: Path) -> Path:
    """Download the chain's files (copies, flat names) and rebuild one standalone image."""
    workdir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, backup in enumerate(chain):
        local = workdir / f"{i:03d}-{target}.qcow2"
        shutil.copyfile(storage / backup / f"{target}.qcow2", local)
        files.append(local)
    out = workdir / f"restored-{target}.qcow2"
    rebuild_chain(files, out)
    return out


def assert_same(a: Path, b: Path) -> None:
    assert compare_images(a, b), f"{a} and {b} differ"


def big_vm(make_vm: vmkit.VMFactory, size: int = 1024 * MiB) -> vmkit.VM:
    """A VM whose vda is full of data, so a full backup takes a while."""
    vm = make_vm("big", [("vda", size), ("vdb", 32 * MiB)], start=False)
    vmkit.fill_disk(vm.disk("vda"), 0x5A, size)
    vmkit.start_vm(vm.name)
    return vm
