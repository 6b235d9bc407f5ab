"""Helpers shared by the virt tests: fake storage layout, restore and compare."""

from __future__ import annotations

import shutil
from pathlib import Path

from app.virt import ScratchFile, rebase_onto
from tests.virt.images import compare_images, rebuild_chain


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
