"""The restore job, run on the instance's hypervisor: storage -> checked chain -> disk image.

Runs in the job skeleton (worker.jobs: claim under the instance's row lock, so a backup and a
restore of one instance never run together; heartbeat; failure; recovery). It fetches and
checks the chain before touching anything, and then either replaces the stopped instance's
disks atomically (in_place) or writes the images next to them (new_disk). A failed restore
leaves the instance exactly as it was, and no work file behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from app import virt
from app.engine.chain_fetch import ChainError, ChainPlan, load_chain, rebuild, remove_tree
from app.engine.chains import Busy
from app.engine.policy_state import refresh_next_run
from app.engine.storage_access import open_driver
from app.engine.webhooks.events import emit_restore
from app.engine.words import Words
from app.metrics import RESTORES
from app.models import Hypervisor, Instance, Restore
from app.storage.files import fsync_path
from app.values import RestoreStatus, RestoreTarget, WebhookEvent
from worker.jobs import Job, JobFailed, Progress, Resources, now, until_recorded

INTERRUPTED = (
    "The worker stopped during the restore; its work files were removed. Disks are replaced "
    "only after the new image is whole and checked: check the instance before retrying"
)
BACKUP_RUNNING = "A backup of this instance is in progress; try the restore again when it finishes"


@dataclass
class Work:
    restore: Restore
    instance: Instance
    hypervisor: Hypervisor
    plan: ChainPlan

    @property
    def short(self) -> str:
        return self.restore.id.hex[:8]

    @property
    def work_dir(self) -> Path:
        return Path(self.hypervisor.scratch_dir) / f"restore-{self.restore.id}"


class RestoreJob(Job[Work]):
    model = Restore
    name = "restore"
    interrupted = INTERRUPTED
    metrics = RESTORES

    async def fail(self, session: AsyncSession, row_id: uuid.UUID, words: Words) -> Any:
        failed = await super().fail(session, row_id, words)
        if failed is not None:
            await emit_restore(session, WebhookEvent.RESTORE_FAILED, failed)
        return failed

    async def refuse(self, session: AsyncSession, row_id: uuid.UUID, work: Busy) -> None:
        await self.fail(session, row_id, Words(BACKUP_RUNNING))

    async def recover(self, session: AsyncSession, row: Any) -> None:
        instance = await session.get(Instance, row.instance_id)
        hypervisor = await session.get(Hypervisor, instance.hypervisor_id) if instance else None
        if instance is None or hypervisor is None:
            return
        await asyncio.to_thread(remove_tree, Path(hypervisor.scratch_dir) / f"restore-{row.id}")
        with contextlib.suppress(virt.VirtError):
            disks = await asyncio.to_thread(
                virt.list_disks, hypervisor.libvirt_uri, instance.domain_name
            )
            for disk in disks:
                for partial in Path(disk.source).parent.glob(f".*.restore-{row.id.hex[:8]}*"):
                    partial.unlink(missing_ok=True)

    async def load(self, session: AsyncSession, row_id: uuid.UUID) -> Work:
        restore = await session.get(Restore, row_id)
        assert restore is not None
        instance = await session.get(Instance, restore.instance_id)
        assert instance is not None
        hypervisor = await session.get(Hypervisor, instance.hypervisor_id)
        assert hypervisor is not None
        if restore.backup_id is None:
            raise ChainError("The backup of this restore was deleted")
        plan = await load_chain(session, restore.backup_id)
        return Work(restore, instance, hypervisor, plan)

    def type_of(self, work: Work) -> str:
        return work.restore.target

    async def execute(self, res: Resources, work: Work, progress: Progress) -> str:
        return await _execute(res, work, progress)

    async def cleanup(self, work: Work) -> None:
        await asyncio.to_thread(remove_tree, work.work_dir)


run_restore = RestoreJob().run


async def _require_shut_off(uri: str, domain: str) -> None:
    state = await asyncio.to_thread(virt.domain_state, uri, domain)
    if state != "shut off":
        raise JobFailed(
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
    if work.restore.target == RestoreTarget.IN_PLACE:
        for target in work.plan.disks:
            disk = by_target.get(target)
            if disk is None:
                raise JobFailed(
                    f"Disk {target} of the backup is not attached to the instance any more; "
                    "restore it as a new disk instead"
                )
            final = Path(disk.source)
            # Same directory: os.replace is then an atomic rename on one filesystem.
            partial = final.with_name(f".{final.name}.restore-{short}.partial")
            placements[target] = Placement(partial, final, disk.format)
        return placements
    if not disks:
        raise JobFailed("Instance has no file-backed disk to restore next to")
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


async def _execute(res: Resources, work: Work, progress: Progress) -> str:
    uri, domain = work.hypervisor.libvirt_uri, work.instance.domain_name
    in_place = work.restore.target == RestoreTarget.IN_PLACE
    if in_place:
        # The API checked the catalog's status; libvirt's word is what counts.
        await _require_shut_off(uri, domain)
    disks = await asyncio.to_thread(virt.list_disks, uri, domain)
    placements = _placements(work, disks)
    await asyncio.to_thread(work.work_dir.mkdir, parents=True, exist_ok=True)

    def report(done: int, total: int) -> None:
        # `total` counts the chain's bytes twice: fetched, then converted into the disk.
        progress.advance(done, total, share=95)

    async with res.session() as session:
        driver = await open_driver(session, work.plan.storage_id)
    try:
        await rebuild(
            driver,
            work.plan,
            work.work_dir,
            {t: p.partial for t, p in placements.items()},
            {t: p.format for t, p in placements.items()},
            report,
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
    result = {t: str(p.final) for t, p in placements.items()}
    progress.bytes = work.plan.total_bytes
    await until_recorded(f"restore {work.restore.id}", lambda: _complete(res, work, result))
    return f"completed {work.restore.target}"


async def _complete(res: Resources, work: Work, result: dict[str, str]) -> None:
    done = now()
    async with res.session() as session:
        completed = await session.scalar(
            update(Restore)
            .where(Restore.id == work.restore.id, Restore.status == RestoreStatus.IN_PROGRESS)
            .values(
                status=RestoreStatus.COMPLETED,
                result=result,
                completed_at=done,
                heartbeat_at=done,
                progress=100,
                error=None,
            )
            .returning(Restore)
        )
        if work.restore.target == RestoreTarget.IN_PLACE and work.instance.backup_policy_id:
            # The disk was rewritten: the next run takes a full, whatever the day.
            await refresh_next_run(session, work.instance.backup_policy_id, done)
        if completed is not None:
            await emit_restore(session, WebhookEvent.RESTORE_COMPLETED, completed)
