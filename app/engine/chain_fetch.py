"""A backup's chain, fetched from storage, checked against the catalog and rebuilt per disk.

Shared by the restore and the verify jobs. The chain (the full and every incremental up to the
chosen backup, by parent links) is read in place from a local-path storage, or else downloaded
into a work dir with the storage's relative layout
``<instance>/<chain>/<backup>/<disk>.qcow2``: each stored incremental names its parent as
``../<parent id>/<disk>.qcow2``, so the newest file converts directly, with no rebase (a rebase
would rewrite the header of the very file whose hash is being checked).

Hashing (sha256 at ~1.9 GB/s, from the page cache mapping) costs about as much as
``qemu-img convert`` itself. The files are therefore hashed *while* the images are converted,
and nothing leaves the work area (no output renamed into place, no disk replaced) before every
hash matched.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app import virt
from app.models import Backup, BackupChain, BackupFile
from app.storage.base import BackupStorageDriver, ObjectNotFound, validate_key
from app.storage.files import fsync_path
from app.storage.pipeline import sha256_of
from app.values import BackupStatus, BackupType
from app.virt.images import LONG_TIMEOUT, run_qemu_img
from app.writeback import written_back

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


class ChainError(Exception):
    """The chain cannot be rebuilt; ``str(err)`` names the piece, in an operator's words."""

    def __init__(self, message: str, backup_id: uuid.UUID | None = None) -> None:
        super().__init__(message)
        self.backup_id = backup_id  # the chain member at fault, when there is one


@dataclass(frozen=True)
class Member:
    """One backup of the chain and its stored files."""

    id: uuid.UUID
    type: str
    created_at: datetime
    parent_id: uuid.UUID | None
    files: Mapping[str, BackupFile]  # disk target -> file

    def label(self, target: str) -> str:
        when = self.created_at.strftime("%Y-%m-%d %H:%M UTC")
        return f"{target} of {self.type} {self.id} ({when})"


@dataclass(frozen=True)
class ChainPlan:
    """What to fetch: members oldest first (the full, then incrementals up to the backup)."""

    backup_id: uuid.UUID
    storage_id: uuid.UUID
    members: list[Member]
    disks: list[str]  # the disk targets the chosen backup holds

    @property
    def total_bytes(self) -> int:
        return sum(f.size_bytes for m in self.members for f in m.files.values())


async def load_chain(session: AsyncSession, backup_id: uuid.UUID) -> ChainPlan:
    """The chain up to ``backup_id`` from the catalog; ChainError when it is not whole."""
    backup = await session.get(Backup, backup_id)
    if backup is None:
        raise ChainError("The backup no longer exists")
    if backup.status != BackupStatus.COMPLETED or backup.chain_id is None:
        raise ChainError(f"Backup {backup.id} is {backup.status}, not completed", backup.id)
    rows = {
        b.id: b
        for b in await session.scalars(select(Backup).where(Backup.chain_id == backup.chain_id))
    }
    files: dict[uuid.UUID, dict[str, BackupFile]] = {}
    for f in await session.scalars(select(BackupFile).where(BackupFile.backup_id.in_(rows))):
        files.setdefault(f.backup_id, {})[f.disk_target] = f
    members: list[Member] = []
    current: Backup | None = backup
    while current is not None:
        if current.status != BackupStatus.COMPLETED:
            raise ChainError(
                f"{current.type.capitalize()} {current.id} of this chain is {current.status}",
                current.id,
            )
        members.append(
            Member(
                current.id,
                current.type,
                current.created_at,
                current.parent_id,
                files.get(current.id, {}),
            )
        )
        if current.type == BackupType.FULL:
            break
        if current.parent_id is None or current.parent_id not in rows:
            raise ChainError(
                f"Incremental {current.id} has lost the backup it builds on", current.id
            )
        if len(members) > len(rows):  # a parent loop would be a catalog bug: never spin
            raise ChainError(f"The chain of backup {backup.id} loops", backup.id)
        current = rows[current.parent_id]
    members.reverse()
    disks = sorted(members[-1].files)
    if not disks:
        raise ChainError(f"Backup {backup.id} holds no disk files", backup.id)
    for member in members:
        for target in disks:
            if target not in member.files:
                raise ChainError(f"{member.label(target)} is not in the catalog", member.id)
    storage_id = backup.storage_id
    if storage_id is None:
        chain = await session.get(BackupChain, backup.chain_id)
        storage_id = chain.storage_id if chain is not None else None
    if storage_id is None:
        raise ChainError(f"Backup {backup.id} has no backup storage recorded", backup.id)
    return ChainPlan(backup.id, storage_id, members, disks)


def work_path(work_dir: Path, key: str) -> Path:
    """Where a stored key lands in the work dir: the same relative layout as on storage."""
    return work_dir.joinpath(*validate_key(key).split("/"))


WRITE_BATCH = 8 * 1024 * 1024  # one thread hop per 8 MiB: per-chunk hops cost more than I/O


async def _download(driver: BackupStorageDriver, key: str, path: Path, done: Progress) -> int:
    """Stream one object to ``path`` (at most ~8 MiB in memory; no fsync: it is scratch)."""
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    f = await asyncio.to_thread(open, path, "wb")
    size = 0
    batch: list[bytes] = []
    batched = 0
    try:
        async for chunk in driver.get(key):
            batch.append(chunk)
            batched += len(chunk)
            if batched >= WRITE_BATCH:
                await asyncio.to_thread(f.writelines, batch)
                size += batched
                done(batched, 0)
                batch, batched = [], 0
        if batch:
            await asyncio.to_thread(f.writelines, batch)
            size += batched
            done(batched, 0)
    finally:
        await asyncio.to_thread(f.close)
    return size


def _missing(member: Member, target: str) -> ChainError:
    return ChainError(f"{member.label(target)} is missing from storage", member.id)


def _check_size(member: Member, target: str, f: BackupFile, size: int) -> None:
    if size != f.size_bytes:
        raise ChainError(
            f"{member.label(target)}: stored file is {size} bytes, the catalog says "
            f"{f.size_bytes}: the stored file is corrupt or truncated",
            member.id,
        )


async def fetch(
    driver: BackupStorageDriver, plan: ChainPlan, work_dir: Path, progress: Progress | None = None
) -> dict[str, Path]:
    """Download every file of the chain; a missing (or short) file is a ChainError naming it.

    Returns where each object key now is."""
    total = plan.total_bytes
    done = [0]

    def step(n: int, _: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    paths: dict[str, Path] = {}
    for member in plan.members:
        for target in plan.disks:
            f = member.files[target]
            path = paths[f.object_key] = work_path(work_dir, f.object_key)
            try:
                size = await _download(driver, f.object_key, path, step)
            except ObjectNotFound as exc:
                raise _missing(member, target) from exc
            _check_size(member, target, f, size)
    return paths


async def _in_place(driver: BackupStorageDriver, plan: ChainPlan) -> dict[str, Path] | None:
    """Where each object key is, when the storage keeps its objects as local files (local
    disk, NFS mount) in the key layout that the files' backing names rely on; else None.

    Copying a chain to a work dir that sits on the same kind of disk only costs time: the
    files are read where they are (read-only), with the same checks as after a download.
    """
    paths: dict[str, Path] = {}
    for member in plan.members:
        for target in plan.disks:
            f = member.files[target]
            path = await driver.local_path(f.object_key)
            if path is None:
                return None
            try:
                size = (await asyncio.to_thread(path.stat)).st_size
            except FileNotFoundError as exc:
                raise _missing(member, target) from exc
            _check_size(member, target, f, size)
            paths[f.object_key] = path
    return paths


async def check_hashes(plan: ChainPlan, paths: Mapping[str, Path]) -> None:
    """sha256 of every fetched file against the catalog, oldest first, two files at a time."""
    jobs = [
        (member, target, member.files[target]) for member in plan.members for target in plan.disks
    ]
    limit = asyncio.Semaphore(2)

    async def one(member: Member, target: str, f: BackupFile) -> str | None:
        async with limit:
            # sha256_of releases the GIL: hashing runs beside the event loop.
            digest = await asyncio.to_thread(sha256_of, paths[f.object_key])
        return None if digest == f.sha256 else member.label(target)

    results = await asyncio.gather(*(one(m, t, f) for m, t, f in jobs))
    for (member, _, _), bad in zip(jobs, results, strict=True):
        if bad is not None:
            raise ChainError(f"{bad}: sha256 mismatch: the stored file is corrupt", member.id)


def _convert(newest: Path, out: Path, out_format: str, durable: bool) -> None:
    # -W: out-of-order writes; the output is a fresh file nobody reads until it is complete.
    # -t unsafe: through the page cache and never flushed, as a plain convert does. A durable
    # output is fsynced once at the end, its writeback started while qemu-img still writes, so
    # the disk and the convert (and the hashes beside it) work at the same time. Written past
    # the cache (-t none) instead, the convert alone took 1.3-1.5x as long as
    # convert-then-fsync on these VMs.
    cmd = ["convert", "-W", "-t", "unsafe", "-O", out_format, str(newest), str(out)]
    with written_back([out]) if durable else contextlib.nullcontext():
        run_qemu_img(cmd, timeout=LONG_TIMEOUT)
    if durable:
        fsync_path(out)


def _check_backing(plan: ChainPlan, paths: Mapping[str, Path]) -> None:
    """Each fetched incremental must name its parent's file, or convert would read elsewhere."""
    files = [(member, target) for member in plan.members for target in plan.disks]

    def info(item: tuple[Member, str]) -> dict[str, Any]:
        member, target = item
        return virt.image_info(paths[member.files[target].object_key])

    # One qemu-img process per file; run side by side, they cost one process's start-up.
    with ThreadPoolExecutor(min(8, len(files))) as pool:
        infos = list(pool.map(info, files))
    for (member, target), image in zip(files, infos, strict=True):
        backing = image.get("backing-filename")
        expected = f"../{member.parent_id}/{target}.qcow2" if member.parent_id else None
        if backing != expected:
            raise ChainError(
                f"{member.label(target)} has backing file {backing!r}, expected {expected!r}",
                member.id,
            )


async def rebuild(
    driver: BackupStorageDriver,
    plan: ChainPlan,
    work_dir: Path,
    outputs: Mapping[str, Path],
    formats: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    *,
    durable: bool = False,
) -> None:
    """Fetch the chain and write each disk's standalone image to ``outputs[target]``.

    Every output exists, passed ``qemu-img check`` and comes from hash-checked files when this
    returns, and is on disk (fsynced) if ``durable``; on any failure no output is left behind.
    ``progress`` gets (done, total) in abstract units: download bytes, then the conversion.
    """
    total = plan.total_bytes * 2
    report = progress or (lambda done, whole: None)
    try:
        paths = await _in_place(driver, plan)
        if paths is None:
            paths = await fetch(driver, plan, work_dir, lambda d, _: report(d, total))
        hashes = asyncio.create_task(check_hashes(plan, paths))
        try:
            await asyncio.to_thread(_check_backing, plan, paths)
            for i, target in enumerate(plan.disks):
                newest = paths[plan.members[-1].files[target].object_key]
                out = outputs[target]
                await asyncio.to_thread(out.unlink, True)
                fmt = (formats or {}).get(target, "qcow2")
                await asyncio.to_thread(_convert, newest, out, fmt, durable)
                report(plan.total_bytes + plan.total_bytes * (i + 1) // len(plan.disks), total)
        except BaseException as exc:
            # A corrupt file makes qemu-img fail too: the hash mismatch is the better reason.
            try:
                await hashes
            except ChainError as bad:
                raise bad from exc
            except BaseException:
                pass
            raise
        await hashes
        for target in plan.disks:
            await asyncio.to_thread(virt.check_image, outputs[target])
    except BaseException:
        for out in outputs.values():
            with contextlib.suppress(OSError):
                await asyncio.shield(asyncio.to_thread(out.unlink, True))
        raise


def remove_tree(path: Path) -> None:
    """Remove a work dir; never raises (cleanup must not hide the real outcome)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
