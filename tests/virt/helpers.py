"""Helpers shared by the virt tests: a VM with data, fake storage layout, restore and compare."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from app.virt import pull_backup
from tests.virt import vmkit
from tests.virt.images import compare_images, rebuild_chain
from tests.virt.vmkit import MiB

T = TypeVar("T")


@dataclass(frozen=True)
class Stored:
    target: str
    path: Path
    size_bytes: int


def back_up(
    domain: str,
    targets: list[str],
    tmp: Path,
    checkpoint: str,
    parent: str | None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Stored]:
    """Back up like the job does, into tmp/storage/<checkpoint>/<target>.qcow2 (an
    incremental's backing file: ../<parent>/<target>.qcow2), scratch under tmp/scratch."""
    return run_async(_back_up(domain, targets, tmp, checkpoint, parent, progress))


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` in a thread of its own: in this one it would leave no event loop for
    the async tests that come after (pytest-asyncio looks for one)."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, coro).result()


async def _back_up(
    domain: str,
    targets: list[str],
    tmp: Path,
    checkpoint: str,
    parent: str | None,
    progress: Callable[[int, int], None] | None,
) -> list[Stored]:
    backing = {t: f"../{parent}/{t}.qcow2" for t in targets} if parent else {}
    folder = tmp / "storage" / checkpoint
    stored: list[Stored] = []
    async with pull_backup(
        vmkit.URI, domain, targets, tmp / "scratch", checkpoint, parent, backing, progress
    ) as pull:
        folder.mkdir(parents=True, exist_ok=True)
        for disk in pull.disks:
            path = folder / f"{disk.target}.qcow2"
            with open(path.with_suffix(".part"), "wb") as f:
                async for chunk in pull.stream(disk):
                    f.write(chunk)
            os.replace(path.with_suffix(".part"), path)
            stored.append(Stored(disk.target, path, path.stat().st_size))
    return stored


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
