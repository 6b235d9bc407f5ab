"""The backup job, run on the instance's hypervisor: libvirt push backup -> qcow2 -> storage.

Claims its pending row with a conditional UPDATE (safe to run twice), keeps a heartbeat and
progress, turns an impossible incremental into a full with the reason recorded, and on any
failure leaves nothing behind: no scratch file, no stored object, no advanced checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from app import virt
from app.engine.chains import InstanceChain, chain_states
from app.engine.lifecycle import apply_retention, record_failure, record_success
from app.engine.storage_access import backup_prefix, open_driver
from app.models import (
    Backup,
    BackupChain,
    BackupFile,
    BackupPolicy,
    Hypervisor,
    Instance,
    Restore,
)
from app.queues import JobQueue
from app.storage.base import BackupStorageDriver, StorageError, StorageFull, StorageUnreachable
from worker.context import WorkerContext
from worker.tasks.backup_decision import Decision, decide, disk_set
from worker.tasks.heartbeat import keep_alive

log = logging.getLogger(__name__)
OVERLAP = "Skipped: another backup of this instance was already running"
INTERRUPTED = "The worker stopped during the backup; it was cleaned up and the next run retries"


def _now() -> datetime:
    return datetime.now(UTC)


class BackupFailed(Exception):
    """A failure already phrased for the operator."""


def describe(exc: BaseException) -> str:
    """The words an operator reads on the backup and the policy card."""
    if isinstance(exc, StorageFull):
        return "Backup storage is full"
    if isinstance(exc, StorageUnreachable):
        return f"Backup storage is unreachable: {exc}"
    if isinstance(exc, StorageError):
        return f"Backup storage error: {exc}"
    if isinstance(exc, virt.VirtError | BackupFailed):
        return str(exc)
    return f"Unexpected error ({type(exc).__name__}): {exc}"


@dataclass
class Work:
    """Everything the job needs, read once at claim time."""

    backup: Backup
    instance: Instance
    hypervisor: Hypervisor
    policy: BackupPolicy | None
    chain: InstanceChain
    progress: list[int] = field(default_factory=lambda: [0])


async def run_backup(ctx: WorkerContext, backup_id: str) -> str:
    sessionmaker = ctx["sessionmaker"]
    work = await _claim(ctx, uuid.UUID(backup_id))
    if work is None:
        return "not pending"
    heartbeat = asyncio.create_task(keep_alive(ctx, Backup, work.backup.id, work.progress))
    try:
        result = await _execute(ctx, work)
    except BaseException as exc:
        message = describe(exc) if isinstance(exc, Exception) else INTERRUPTED
        if not isinstance(exc, virt.VirtError | StorageError | BackupFailed):
            log.exception("backup %s failed", backup_id)
        async with sessionmaker() as session:
            failed = await session.scalar(
                update(Backup)
                .where(Backup.id == work.backup.id, Backup.status == "in_progress")
                .values(status="failed", error=message, completed_at=_now(), progress=None)
                .returning(Backup)
            )
            if failed is not None:
                await record_failure(session, failed, message, _now())
            await session.commit()
        if not isinstance(exc, Exception):
            raise
        return f"failed: {message}"
    finally:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
    return result


RESTORE_RUNNING = "A restore of this instance is in progress"


async def _claim(ctx: WorkerContext, backup_id: uuid.UUID) -> Work | None:
    now = _now()
    async with ctx["sessionmaker"]() as session:
        # The instance row lock is shared with the restore job's claim: never both at once.
        instance_id = await session.scalar(
            select(Instance.id)
            .join(Backup, Backup.instance_id == Instance.id)
            .where(Backup.id == backup_id)
            .with_for_update(of=Instance)
        )
        restoring = await session.scalar(
            select(Restore.id)
            .where(Restore.instance_id == instance_id, Restore.status == "in_progress")
            .limit(1)
        )
        if restoring is not None:
            refused = await session.scalar(
                update(Backup)
                .where(Backup.id == backup_id, Backup.status == "pending")
                .values(status="failed", error=RESTORE_RUNNING, completed_at=now, progress=None)
                .returning(Backup)
            )
            if refused is not None:
                await record_failure(session, refused, RESTORE_RUNNING, now)
            await session.commit()
            return None
        overlapping = await session.scalar(
            select(Backup.id)
            .where(
                Backup.instance_id == instance_id,
                Backup.status == "in_progress",
                Backup.id != backup_id,
            )
            .limit(1)
        )
        if overlapping is not None:
            # Two backups were queued at once (a scheduled slot and Backup now): the instance's
            # disks take one job at a time. Skipped, not an error of the policy.
            await session.execute(
                update(Backup)
                .where(Backup.id == backup_id, Backup.status == "pending")
                .values(status="failed", error=OVERLAP, completed_at=now, progress=None)
            )
            await session.commit()
            return None
        backup = await session.scalar(
            update(Backup)
            .where(Backup.id == backup_id, Backup.status == "pending")
            .values(status="in_progress", started_at=now, heartbeat_at=now, progress=0)
            .returning(Backup)
        )
        if backup is None:
            await _recover_interrupted(ctx, session, backup_id)
            await session.commit()
            return None
        instance = await session.get(Instance, backup.instance_id)
        assert instance is not None
        hypervisor = await session.get(Hypervisor, instance.hypervisor_id)
        assert hypervisor is not None
        policy = await session.get(BackupPolicy, backup.policy_id) if backup.policy_id else None
        chain = (await chain_states(session, [instance.id]))[instance.id]
        await session.commit()
    return Work(backup, instance, hypervisor, policy, chain)


async def _recover_interrupted(ctx: WorkerContext, session: Any, backup_id: uuid.UUID) -> None:
    """arq re-runs a job whose worker died: abort libvirt's job, clean up, fail the row."""
    backup = await session.get(Backup, backup_id, with_for_update=True)
    if backup is None or backup.status != "in_progress" or ctx.get("job_try", 1) <= 1:
        return
    instance = await session.get(Instance, backup.instance_id)
    hypervisor = await session.get(Hypervisor, instance.hypervisor_id)
    checkpoint = f"ibp-{backup.id}"
    with contextlib.suppress(virt.VirtError):
        await asyncio.to_thread(virt.abort_job, hypervisor.libvirt_uri, instance.domain_name)
    with contextlib.suppress(virt.VirtError):
        await asyncio.to_thread(
            virt.delete_checkpoint, hypervisor.libvirt_uri, instance.domain_name, checkpoint
        )
    await asyncio.to_thread(_remove_scratch, Path(hypervisor.scratch_dir), checkpoint)
    backup.status = "failed"
    backup.error = INTERRUPTED
    backup.completed_at = _now()
    backup.progress = None
    await record_failure(session, backup, INTERRUPTED, _now())


def _remove_scratch(scratch_dir: Path, checkpoint: str) -> None:
    for path in scratch_dir.glob(f"{checkpoint}-*"):
        path.unlink(missing_ok=True)


async def _execute(ctx: WorkerContext, work: Work) -> str:
    backup, instance, hv = work.backup, work.instance, work.hypervisor
    uri, domain = hv.libvirt_uri, instance.domain_name
    if hv.backup_storage_id is None:
        raise BackupFailed(f"Hypervisor {hv.name} has no backup storage configured")
    state = await asyncio.to_thread(virt.domain_state, uri, domain)
    if state != "running":
        raise virt.DomainNotRunning(state)
    all_disks = await asyncio.to_thread(virt.list_disks, uri, domain)
    disks = [d for d in all_disks if backup.backup_device == "all" or d.boot]
    if not disks:
        raise BackupFailed("Instance has no file-backed disk to back up")
    checkpoints = await asyncio.to_thread(virt.list_checkpoints, uri, domain)
    decision = decide(work.backup, work.chain, disks, checkpoints)
    checkpoint = f"ibp-{backup.id}"
    scratch = Path(hv.scratch_dir)

    async with ctx["sessionmaker"]() as session:
        driver = await open_driver(session, hv.backup_storage_id)
    try:
        await _guard_free_space(driver, disks, decision)
        files = await _take(work, uri, domain, disks, scratch, checkpoint, decision)
        try:
            stored = await _store(work, driver, files, decision, checkpoint)
        except BaseException:
            with contextlib.suppress(virt.VirtError):
                await asyncio.to_thread(virt.delete_checkpoint, uri, domain, checkpoint)
            raise
        finally:
            await asyncio.to_thread(_remove_scratch, scratch, checkpoint)
    finally:
        await driver.close()

    await _complete(ctx, work, decision, disks, checkpoint, stored)
    # Only the newest checkpoint is ever a parent: older bitmaps would slow the guest's writes.
    with contextlib.suppress(virt.VirtError):
        await asyncio.to_thread(virt.prune_checkpoints, uri, domain, [checkpoint])
    return f"completed {decision.type}"


async def _guard_free_space(
    driver: BackupStorageDriver, disks: list[virt.DiskInfo], decision: Decision
) -> None:
    if decision.type != "full":
        return
    free = await driver.free_bytes()
    if free is None:
        return
    estimate = 0
    for disk in disks:
        info = await asyncio.to_thread(virt.image_info, Path(disk.source))
        estimate += int(info.get("actual-size") or disk.size_bytes)
    if free < estimate:
        raise StorageFull(f"{free} bytes free, about {estimate} needed")


async def _take(
    work: Work,
    uri: str,
    domain: str,
    disks: list[virt.DiskInfo],
    scratch: Path,
    checkpoint: str,
    decision: Decision,
) -> list[virt.ScratchFile]:
    def progress(done: int, total: int) -> None:
        if total:
            work.progress[0] = int(80 * done / total)

    targets = [d.target for d in disks]
    try:
        return await _run_cancellable(uri, domain, targets, scratch, checkpoint, decision, progress)
    except virt.CheckpointBroken as exc:
        if decision.type != "incremental":
            raise
        # The bitmap is gone (QEMU killed, VM redefined): clean the metadata, start a new chain.
        await asyncio.to_thread(virt.reset_checkpoints, uri, domain)
        decision.type, decision.parent_id, decision.incremental_from = "full", None, None
        decision.chain_id = uuid.uuid4()
        decision.reset_reason = str(exc)
        return await _run_cancellable(uri, domain, targets, scratch, checkpoint, decision, progress)


async def _run_cancellable(
    uri: str,
    domain: str,
    targets: list[str],
    scratch: Path,
    checkpoint: str,
    decision: Decision,
    progress: virt.Progress,
) -> list[virt.ScratchFile]:
    """libvirt's job runs in a thread; if this task is cancelled (arq's timeout, shutdown), the
    event tells the thread to abort the job and clean up instead of running on unseen."""
    cancel = threading.Event()
    try:
        return await asyncio.to_thread(
            virt.run_backup,
            uri,
            domain,
            targets,
            scratch,
            checkpoint,
            decision.incremental_from,
            progress,
            cancel,
        )
    except asyncio.CancelledError:
        cancel.set()
        raise


@dataclass(frozen=True)
class Stored:
    target: str
    key: str
    size: int
    sha256: str


async def _store(
    work: Work,
    driver: BackupStorageDriver,
    files: list[virt.ScratchFile],
    decision: Decision,
    checkpoint: str,
) -> list[Stored]:
    backup = work.backup
    prefix = backup_prefix(backup.instance_id, decision.chain_id, backup.id)
    stored: list[Stored] = []
    try:
        for f in files:
            if decision.parent_id is not None:
                # Created with the live disk as backing file: point it at the parent's file.
                await asyncio.to_thread(
                    virt.rebase_onto, f.path, f"../{decision.parent_id}/{f.target}.qcow2"
                )
            key = f"{prefix}/{f.target}.qcow2"
            result = await driver.put_file(key, f.path)
            stored.append(Stored(f.target, key, result.size, result.sha256))
            work.progress[0] = 80 + int(20 * len(stored) / len(files))
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
            "created_at": _now().isoformat(),
        }
        await driver.put(f"{prefix}/manifest.json", _one(json.dumps(manifest, indent=2).encode()))
    except BaseException:
        for key in [s.key for s in stored] + [f"{prefix}/manifest.json"]:
            with contextlib.suppress(Exception):
                await driver.delete(key)
        raise
    return stored


async def _one(data: bytes) -> Any:
    yield data


async def _complete(
    ctx: WorkerContext,
    work: Work,
    decision: Decision,
    disks: list[virt.DiskInfo],
    checkpoint: str,
    stored: list[Stored],
) -> None:
    backup, hv = work.backup, work.hypervisor
    now = _now()
    jobs = JobQueue()
    async with ctx["sessionmaker"]() as session:
        if decision.type == "full":
            session.add(
                BackupChain(
                    id=decision.chain_id,
                    instance_id=backup.instance_id,
                    policy_id=backup.policy_id,
                    backup_device=backup.backup_device,
                    disks=disk_set(disks),
                    storage_id=hv.backup_storage_id,
                    created_at=now,
                )
            )
            await session.flush()
        for s in stored:
            session.add(
                BackupFile(
                    id=uuid.uuid4(),
                    backup_id=backup.id,
                    disk_target=s.target,
                    object_key=s.key,
                    size_bytes=s.size,
                    sha256=s.sha256,
                    created_at=now,
                )
            )
        converted = backup.type != decision.type
        values: dict[str, Any] = {
            "status": "completed",
            "type": decision.type,
            "chain_id": decision.chain_id,
            "parent_id": decision.parent_id,
            "checkpoint_name": checkpoint,
            "size_bytes": sum(s.size for s in stored),
            "storage_id": hv.backup_storage_id,
            "completed_at": now,
            "heartbeat_at": now,
            "progress": 100,
        }
        if decision.reset_reason and (converted or decision.type == "full"):
            values["chain_reset_reason"] = decision.reset_reason
        if converted:
            values["plan_reason"] = f"full backup: {decision.reset_reason}"
        done = await session.scalar(
            update(Backup)
            .where(Backup.id == backup.id, Backup.status == "in_progress")
            .values(**values)
            .returning(Backup)
        )
        if done is None:
            raise BackupFailed("The backup was taken over by another worker")
        if decision.type == "full" and work.policy is not None:
            await apply_retention(
                session, backup.instance_id, work.policy.retention_count, decision.chain_id, jobs
            )
        await record_success(session, done)
        await session.commit()
    await jobs.flush(ctx.get("redis"))
