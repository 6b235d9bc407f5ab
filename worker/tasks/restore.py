"""The restore job, run on the instance's hypervisor: storage -> checked chain -> disk image.

Claims its pending row with a conditional UPDATE under the instance's row lock (a backup and a
restore of one instance never run together), keeps a heartbeat and progress, fetches and checks
the chain before touching anything, and then either replaces the stopped instance's disks
atomically (in_place) or writes the images next to them (new_disk). A failed restore leaves the
instance exactly as it was, and no work file behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app import virt
from app.engine.chain_fetch import ChainError, ChainPlan, load_chain, rebuild, remove_tree
from app.engine.storage_access import open_driver
from app.models import Backup, Hypervisor, Instance, Restore
from app.storage.base import StorageError
from app.storage.files import fsync_path
from worker.context import WorkerContext
from worker.tasks.backup import describe as describe_backup_error
from worker.tasks.heartbeat import keep_alive

log = logging.getLogger(__name__)
INTERRUPTED = (
    "The worker stopped during the restore; its work files were removed. Disks are replaced "
    "only after the new image is whole and checked: check the instance before retrying"
)
BACKUP_RUNNING = "A backup of this instance is in progress; try the restore again when it finishes"


def _now() -> datetime:
    return datetime.now(UTC)


class RestoreFailed(Exception):
    """A failure already phrased for the operator."""


def describe(exc: BaseException) -> str:
    if isinstance(exc, ChainError | RestoreFailed):
        return str(exc)
    return describe_backup_error(exc)


@dataclass
class Work:
    restore: Restore
    instance: Instance
    hypervisor: Hypervisor
    plan: ChainPlan
    progress: list[int] = field(default_factory=lambda: [0])

    @property
    def short(self) -> str:
        return self.restore.id.hex[:8]

    @property
    def work_dir(self) -> Path:
        return Path(self.hypervisor.scratch_dir) / f"restore-{self.restore.id}"


async def run_restore(ctx: WorkerContext, restore_id: str) -> str:
    rid = uuid.UUID(restore_id)
    try:
        work = await _claim(ctx, rid)
    except ChainError as exc:  # the catalog cannot describe a whole chain: nothing to do
        await _fail(ctx, rid, str(exc))
        return f"failed: {exc}"
    if work is None:
        return "not pending"
    heartbeat = asyncio.create_task(keep_alive(ctx, Restore, work.restore.id, work.progress))
    try:
        result = await _execute(ctx, work)
    except BaseException as exc:
        message = describe(exc) if isinstance(exc, Exception) else INTERRUPTED
        if not isinstance(exc, virt.VirtError | StorageError | ChainError | RestoreFailed):
            log.exception("restore %s failed", restore_id)
        await _fail(ctx, rid, message)
        if not isinstance(exc, Exception):
            raise
        return f"failed: {message}"
    finally:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
        await asyncio.to_thread(remove_tree, work.work_dir)
    return result


async def _fail(ctx: WorkerContext, restore_id: uuid.UUID, message: str) -> None:
    async with ctx["sessionmaker"]() as session:
        await session.execute(
            update(Restore)
            .where(Restore.id == restore_id, Restore.status.in_(("pending", "in_progress")))
            .values(status="failed", error=message, completed_at=_now(), progress=None)
        )
        await session.commit()


async def _claim(ctx: WorkerContext, restore_id: uuid.UUID) -> Work | None:
    now = _now()
    async with ctx["sessionmaker"]() as session:
        restore = await session.get(Restore, restore_id)
        if restore is None:
            return None
        # Same lock as the backup job's claim: only one of them can start at a time.
        await session.execute(
            select(Instance.id).where(Instance.id == restore.instance_id).with_for_update()
        )
        if restore.status == "in_progress" and ctx.get("job_try", 1) > 1:
            await _recover_interrupted(session, restore)
            await session.commit()
            return None
        if restore.status != "pending":
            return None
        running = await session.scalar(
            select(Backup.id)
            .where(Backup.instance_id == restore.instance_id, Backup.status == "in_progress")
            .limit(1)
        )
        values: dict[str, Any] = (
            {"status": "failed", "error": BACKUP_RUNNING, "completed_at": now}
            if running is not None
            else {"status": "in_progress", "started_at": now, "heartbeat_at": now, "progress": 0}
        )
        claimed = await session.scalar(
            update(Restore)
            .where(Restore.id == restore_id, Restore.status == "pending")
            .values(**values)
            .returning(Restore)
        )
        await session.commit()
        if claimed is None or claimed.status != "in_progress":
            return None
        instance = await session.get(Instance, claimed.instance_id)
        assert instance is not None
        hypervisor = await session.get(Hypervisor, instance.hypervisor_id)
        assert hypervisor is not None
        if claimed.backup_id is None:
            raise ChainError("The backup of this restore was deleted")
        plan = await load_chain(session, claimed.backup_id)
    return Work(claimed, instance, hypervisor, plan)


async def _recover_interrupted(session: AsyncSession, restore: Restore) -> None:
    """arq re-runs a job whose worker died: remove what it left, fail the row."""
    instance = await session.get(Instance, restore.instance_id)
    hypervisor = await session.get(Hypervisor, instance.hypervisor_id) if instance else None
    if instance is not None and hypervisor is not None:
        await asyncio.to_thread(remove_tree, Path(hypervisor.scratch_dir) / f"restore-{restore.id}")
        with contextlib.suppress(virt.VirtError):
            disks = await asyncio.to_thread(
                virt.list_disks, hypervisor.libvirt_uri, instance.domain_name
            )
            for disk in disks:
                for partial in Path(disk.source).parent.glob(f".*.restore-{restore.id.hex[:8]}*"):
                    partial.unlink(missing_ok=True)
    restore.status = "failed"
    restore.error = INTERRUPTED
    restore.completed_at = _now()
    restore.progress = None


async def _require_shut_off(uri: str, domain: str) -> None:
    state = await asyncio.to_thread(virt.domain_state, uri, domain)
    if state != "shut off":
        raise RestoreFailed(
            f"Instance must be shut off for an in-place restore (libvirt state: {state}); "
            "its disks were not changed"
        )


@dataclass(frozen=True)
class Placement:
    """Where one disk's image is built (a hidden partial) and where it ends up."""

    partial: Path
    final: Path
    format: str


def _placements(work: Work, disks: list[virt.DiskInfo]) -> dict[str, Placement]:
    by_target = {d.target: d for d in disks}
    domain, short = work.instance.domain_name, work.short
    placements: dict[str, Placement] = {}
    if work.restore.target == "in_place":
        for target in work.plan.disks:
            disk = by_target.get(target)
            if disk is None:
                raise RestoreFailed(
                    f"Disk {target} of the backup is not attached to the instance any more; "
                    "restore it as a new disk instead"
                )
            final = Path(disk.source)
            # Same directory: os.replace is then an atomic rename on one filesystem.
            partial = final.with_name(f".{final.name}.restore-{short}.partial")
            placements[target] = Placement(partial, final, disk.format)
        return placements
    if not disks:
        raise RestoreFailed("Instance has no file-backed disk to restore next to")
    default_dir = Path(next((d for d in disks if d.boot), disks[0]).source).parent
    for target in work.plan.disks:
        disk = by_target.get(target)
        folder = Path(disk.source).parent if disk is not None else default_dir
        final = folder / f"{domain}-{target}-restore-{short}.qcow2"
        partial = folder / f".{final.name}.partial"
        placements[target] = Placement(partial, final, "qcow2")
    return placements


def _replace(placement: Placement) -> None:
    """Swap the restored image in; it keeps the old disk's owner and mode (QEMU opens it).

    The image is on disk (fsync) before the rename, and the rename before we report success:
    a crash right after a restore must not leave a half-written disk in the VM's place.
    """
    st = placement.final.stat()
    os.chown(placement.partial, st.st_uid, st.st_gid)
    os.chmod(placement.partial, st.st_mode & 0o7777)
    fsync_path(placement.partial)
    os.replace(placement.partial, placement.final)
    fsync_path(placement.final.parent)


def _place_new(placement: Placement) -> None:
    """Name a new disk's image (already on disk: rebuilt durable), and make the name durable
    before we report success."""
    os.replace(placement.partial, placement.final)
    fsync_path(placement.final.parent)


async def _execute(ctx: WorkerContext, work: Work) -> str:
    uri, domain = work.hypervisor.libvirt_uri, work.instance.domain_name
    in_place = work.restore.target == "in_place"
    if in_place:
        # The API checked the catalog's status; libvirt's word is what counts.
        await _require_shut_off(uri, domain)
    disks = await asyncio.to_thread(virt.list_disks, uri, domain)
    placements = _placements(work, disks)
    await asyncio.to_thread(work.work_dir.mkdir, parents=True, exist_ok=True)

    def progress(done: int, total: int) -> None:
        if total:
            work.progress[0] = int(95 * done / total)

    async with ctx["sessionmaker"]() as session:
        driver = await open_driver(session, work.plan.storage_id)
    try:
        await rebuild(
            driver,
            work.plan,
            work.work_dir,
            {t: p.partial for t, p in placements.items()},
            {t: p.format for t, p in placements.items()},
            progress,
            durable=True,
        )
        if in_place:
            await _require_shut_off(uri, domain)  # nobody started it while we rebuilt
        for placement in placements.values():
            if in_place:
                await asyncio.to_thread(_replace, placement)
            else:
                await asyncio.to_thread(_place_new, placement)
    finally:
        await driver.close()
        for placement in placements.values():
            with contextlib.suppress(OSError):
                await asyncio.shield(asyncio.to_thread(placement.partial.unlink, True))
    if in_place:
        # The disks no longer match the checkpoints' bitmaps: forget them (metadata only), so
        # the next backup is a full; chains.py also sees this restore as a chain reset.
        with contextlib.suppress(virt.VirtError):
            await asyncio.to_thread(virt.reset_checkpoints, uri, domain)
    await _complete(ctx, work, {t: str(p.final) for t, p in placements.items()})
    return f"completed {work.restore.target}"


async def _complete(ctx: WorkerContext, work: Work, result: dict[str, str]) -> None:
    now = _now()
    async with ctx["sessionmaker"]() as session:
        await session.execute(
            update(Restore)
            .where(Restore.id == work.restore.id, Restore.status == "in_progress")
            .values(
                status="completed",
                result=result,
                completed_at=now,
                heartbeat_at=now,
                progress=100,
                error=None,
            )
        )
        await session.commit()
