"""The backup job, run on the instance's hypervisor: libvirt pull backup -> qcow2 -> storage.

Runs in the job skeleton (worker.jobs: claim, heartbeat, failure, recovery); turns an
impossible incremental into a full with the reason recorded, and on any failure leaves
nothing behind: no scratch file, no stored object, no advanced checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app import virt
from app.engine.chains import Busy, chain_states
from app.engine.lifecycle import StoredFile, record_completion, record_failure
from app.engine.policy_state import OVERLAP, RESTORE_RUNNING
from app.engine.storage_access import backup_prefix, open_driver
from app.engine.words import Words
from app.metrics import BACKUPS
from app.models import Backup, Hypervisor, Instance
from app.queues import JobQueue
from app.scheduling import Chain, Decision, decide
from app.storage.base import BackupStorageDriver, StorageError, StorageFull
from app.values import BackupDevice, BackupType
from worker.jobs import Job, JobFailed, Progress, Resources, now, until_recorded

log = logging.getLogger(__name__)
INTERRUPTED = "The worker stopped during the backup; it was cleaned up and the next run retries"


@dataclass
class Work:
    """Everything the job needs, read once when it starts."""

    backup: Backup
    instance: Instance
    hypervisor: Hypervisor
    chain: Chain


class BackupJob(Job[Work]):
    model = Backup
    name = "backup"
    interrupted = INTERRUPTED
    metrics = BACKUPS

    async def fail(self, session: AsyncSession, row_id: uuid.UUID, words: Words) -> Any:
        failed = await super().fail(session, row_id, words)
        if failed is not None and words.user != OVERLAP:
            await record_failure(session, failed, words.user, now())
        return failed

    async def refuse(self, session: AsyncSession, row_id: uuid.UUID, work: Busy) -> None:
        # Two backups queued at once (a slot and Backup now): the disks take one job at a
        # time, and the second is skipped, not an error of the policy.
        await self.fail(
            session, row_id, Words(RESTORE_RUNNING if work.kind == "restore" else OVERLAP)
        )

    async def recover(self, session: AsyncSession, row: Any) -> None:
        instance = await session.get(Instance, row.instance_id)
        assert instance is not None
        hypervisor = await session.get(Hypervisor, instance.hypervisor_id)
        assert hypervisor is not None
        checkpoint = f"ibp-{row.id}"
        with contextlib.suppress(virt.VirtError):
            await asyncio.to_thread(virt.abort_job, hypervisor.libvirt_uri, instance.domain_name)
        with contextlib.suppress(virt.VirtError):
            await asyncio.to_thread(
                virt.delete_checkpoint, hypervisor.libvirt_uri, instance.domain_name, checkpoint
            )
        await asyncio.to_thread(_remove_scratch, Path(hypervisor.scratch_dir), checkpoint)
        if hypervisor.backup_storage_id is not None:
            driver = await open_driver(session, hypervisor.backup_storage_id)
            try:
                await discard_uploads(driver, row.instance_id, row.id)
            except StorageError as exc:  # the storage reconciliation sweeps what is left
                log.warning("backup %s: could not remove its partial uploads: %s", row.id, exc)
            finally:
                await driver.close()

    async def load(self, session: AsyncSession, row_id: uuid.UUID) -> Work:
        backup = await session.get(Backup, row_id)
        assert backup is not None
        instance = await session.get(Instance, backup.instance_id)
        assert instance is not None
        hypervisor = await session.get(Hypervisor, instance.hypervisor_id)
        assert hypervisor is not None
        chain = (await chain_states(session, [instance.id]))[instance.id]
        return Work(backup, instance, hypervisor, chain)

    def type_of(self, work: Work) -> str:
        return work.backup.type

    async def execute(self, res: Resources, work: Work, progress: Progress) -> str:
        return await _execute(res, work, progress)


run_backup = BackupJob().run


def _remove_scratch(scratch_dir: Path, checkpoint: str) -> None:
    for path in scratch_dir.glob(f"{checkpoint}[.-]*"):
        path.unlink(missing_ok=True)


def disk_set(disks: list[virt.DiskInfo]) -> list[dict[str, object]]:
    return [{"target": d.target, "size_bytes": d.size_bytes} for d in disks]


async def _execute(res: Resources, work: Work, progress: Progress) -> str:
    backup, instance, hv = work.backup, work.instance, work.hypervisor
    uri, domain = hv.libvirt_uri, instance.domain_name
    if hv.backup_storage_id is None:
        raise JobFailed(
            f"Hypervisor {hv.name} has no backup storage configured",
            user="No backup storage is configured for this instance's hypervisor",
        )
    state = await asyncio.to_thread(virt.domain_state, uri, domain)
    if state != "running":
        raise virt.DomainNotRunning(state)
    all_disks = await asyncio.to_thread(virt.list_disks, uri, domain)
    disks = [d for d in all_disks if BackupDevice(backup.backup_device).covers(d.boot)]
    if not disks:
        raise JobFailed("Instance has no file-backed disk to back up")
    checkpoints = await asyncio.to_thread(virt.list_checkpoints, uri, domain)
    decision = decide(
        backup.type,
        backup.chain_reset_reason,
        work.chain,
        backup.backup_device,
        hv.backup_storage_id,
        {d.target: d.size_bytes for d in disks},
        checkpoints,
        uuid.uuid4(),
    )
    progress.type = decision.type
    checkpoint = f"ibp-{backup.id}"
    scratch = Path(hv.scratch_dir)

    async with res.session() as session:
        driver = await open_driver(session, hv.backup_storage_id)
    try:
        stored = await _back_up(work, driver, disks, scratch, checkpoint, decision, progress)
        # An incremental whose bitmap was gone became a full.
        progress.type, progress.bytes = decision.type, sum(s.size for s in stored)

        async def record() -> JobQueue:
            jobs = JobQueue()
            async with res.session() as session:
                await record_completion(
                    session,
                    backup.id,
                    decision,
                    disk_set(disks),
                    hv.backup_storage_id,
                    checkpoint,
                    stored,
                    now(),
                    jobs,
                )
            return jobs

        try:
            jobs = await until_recorded(f"backup {backup.id}: recording completion", record)
        except BaseException:
            # Not in the catalog: nothing would ever delete these files.
            await _unstore(driver, _stored_keys(backup, decision, stored))
            raise
    except BaseException:
        # The chain must not advance past a backup that does not exist.
        with contextlib.suppress(virt.VirtError):
            await asyncio.to_thread(virt.delete_checkpoint, uri, domain, checkpoint)
        raise
    finally:
        await driver.close()
    await jobs.flush(res.redis)
    # Only the newest checkpoint is ever a parent: older bitmaps would slow the guest's writes.
    with contextlib.suppress(virt.VirtError):
        await asyncio.to_thread(virt.prune_checkpoints, uri, domain, [checkpoint])
    return f"completed {decision.type}"


async def _back_up(
    work: Work,
    driver: BackupStorageDriver,
    disks: list[virt.DiskInfo],
    scratch: Path,
    checkpoint: str,
    decision: Decision,
    progress: Progress,
) -> list[StoredFile]:
    try:
        return await _stream(work, driver, disks, scratch, checkpoint, decision, progress)
    except virt.CheckpointBroken as exc:
        if decision.type != BackupType.INCREMENTAL:
            raise
        # The bitmap is gone (QEMU killed, VM redefined): clean the metadata, start a new chain.
        uri, domain = work.hypervisor.libvirt_uri, work.instance.domain_name
        await asyncio.to_thread(virt.reset_checkpoints, uri, domain)
        decision.type, decision.parent_id, decision.incremental_from = BackupType.FULL, None, None
        decision.chain_id = uuid.uuid4()
        decision.reset_reason = str(exc)
        return await _stream(work, driver, disks, scratch, checkpoint, decision, progress)


async def _stream(
    work: Work,
    driver: BackupStorageDriver,
    disks: list[virt.DiskInfo],
    scratch: Path,
    checkpoint: str,
    decision: Decision,
    progress: Progress,
) -> list[StoredFile]:
    """Stream each disk's image straight into the storage, then the manifest."""
    backup = work.backup
    prefix = backup_prefix(backup.instance_id, decision.chain_id, backup.id)
    targets = [d.target for d in disks]
    backing = {}
    if decision.parent_id is not None:
        backing = {t: f"../{decision.parent_id}/{t}.qcow2" for t in targets}

    stored: list[StoredFile] = []
    try:
        async with virt.pull_backup(
            work.hypervisor.libvirt_uri,
            work.instance.domain_name,
            targets,
            scratch,
            checkpoint,
            decision.incremental_from,
            backing,
            progress.advance,
        ) as pull:
            free = await driver.free_bytes()
            if free is not None and free < pull.planned:
                raise StorageFull(f"{free} bytes free, {pull.planned} needed", pull.planned, free)
            for disk in pull.disks:
                key = f"{prefix}/{disk.target}.qcow2"
                result = await driver.put(key, pull.stream(disk), size=disk.layout.size)
                stored.append(StoredFile(disk.target, key, result.size, result.sha256))
        manifest = {
            "format": "ibp-backup-manifest/1",
            "backup_id": str(backup.id),
            "instance_id": str(backup.instance_id),
            "instance_name": work.instance.name,
            "domain_name": work.instance.domain_name,
            "type": decision.type,
            "chain_id": str(decision.chain_id),
            "parent_id": str(decision.parent_id) if decision.parent_id else None,
            "checkpoint": checkpoint,
            "backup_device": backup.backup_device,
            "chain_reset_reason": decision.reset_reason,
            "disks": [
                {"target": s.target, "key": s.key, "size_bytes": s.size, "sha256": s.sha256}
                for s in stored
            ],
            "created_at": now().isoformat(),
        }
        data = json.dumps(manifest, indent=2).encode()
        await driver.put(f"{prefix}/manifest.json", _one(data), size=len(data))
    except BaseException:
        await _unstore(driver, _stored_keys(backup, decision, stored))
        raise
    return stored


async def discard_uploads(
    driver: BackupStorageDriver, instance_id: uuid.UUID, backup_id: uuid.UUID
) -> None:
    """Remove every object and unfinished upload of one backup (its chain is not known: the
    job that decided it is gone)."""
    prefix, mine = f"{instance_id}/", f"/{backup_id}/"
    for found in await driver.list(prefix):
        if mine in found.key:
            await driver.delete(found.key)
    for upload in await driver.partial_uploads(prefix):
        if mine in upload.key:
            await driver.discard(upload)


def _stored_keys(backup: Backup, decision: Decision, stored: list[StoredFile]) -> list[str]:
    prefix = backup_prefix(backup.instance_id, decision.chain_id, backup.id)
    return [s.key for s in stored] + [f"{prefix}/manifest.json"]


async def _unstore(driver: BackupStorageDriver, keys: list[str]) -> None:
    """Best effort: what is left is found by the storage reconciliation."""
    for key in keys:
        with contextlib.suppress(Exception):
            await driver.delete(key)


async def _one(data: bytes) -> Any:
    yield data
