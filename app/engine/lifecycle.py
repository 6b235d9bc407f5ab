"""What happens around a backup's run: its completion in the catalog, retention, the policy's
status, stale work, and an instance leaving with its backups."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.engine.chains import completed_chains
from app.engine.policy_state import policy_errored, policy_recovered, refresh_next_run
from app.engine.protection import evaluate_protection
from app.engine.webhooks.events import emit_backup, emit_restore
from app.models import Backup, BackupChain, BackupFile, BackupPolicy, Instance, Restore
from app.queues import JobQueue, enqueue_backup, enqueue_deletion, enqueue_restore
from app.scheduling import Decision, chains_to_delete
from app.values import BackupStatus, BackupType, WebhookEvent

WORKER_LOST = "Worker lost: no heartbeat from the backup job; the next run will retry"
NEVER_STARTED = "Backup never started: is the hypervisor's worker running?"
RESTORE_WORKER_LOST = (
    "Worker lost: no heartbeat from the restore job. Disks are replaced only after the new "
    "image is whole and checked; check the instance before retrying"
)
RESTORE_NEVER_STARTED = "Restore never started: is the hypervisor's worker running?"


@dataclass(frozen=True)
class StoredFile:
    """One disk's image as the job stored it."""

    target: str
    key: str
    size: int
    sha256: str


class NotRecorded(Exception):
    """A backup's files are stored but the catalog cannot take it as completed; the job
    removes the files (nothing would ever delete them) and fails the backup."""


class TakenOver(NotRecorded):
    """The backup was no longer in progress when its completion was recorded."""


class ChainUnreachable(NotRecorded):
    """An incremental whose parent a restore could not reach from where it was written."""


async def record_completion(
    session: AsyncSession,
    backup_id: uuid.UUID,
    decision: Decision,
    disks: list[dict[str, object]],
    storage_id: uuid.UUID | None,
    checkpoint: str,
    stored: list[StoredFile],
    completed_at: datetime,
    jobs: JobQueue,
) -> Backup:
    """A backup's files are stored: the catalog says so (its chain, files and outcome), then
    retention runs and the policy's status follows. `disks`: target and size of each disk.

    Safe to call again after a lost commit: a backup already recorded is returned as it is."""
    backup = await session.get(Backup, backup_id)
    assert backup is not None
    if backup.status == BackupStatus.COMPLETED and backup.checkpoint_name == checkpoint:
        return backup  # an earlier attempt committed, and its answer was lost with the connection
    if decision.type == BackupType.INCREMENTAL:
        await _require_parent(session, decision, storage_id)
    converted = backup.type != decision.type
    if decision.type == BackupType.FULL:
        session.add(
            BackupChain(
                id=decision.chain_id,
                instance_id=backup.instance_id,
                policy_id=backup.policy_id,
                backup_device=backup.backup_device,
                disks=disks,
                storage_id=storage_id,
                created_at=completed_at,
            )
        )
        await session.flush()
    for s in stored:
        session.add(
            BackupFile(
                id=uuid.uuid4(),
                backup_id=backup_id,
                disk_target=s.target,
                object_key=s.key,
                size_bytes=s.size,
                sha256=s.sha256,
                created_at=completed_at,
            )
        )
    values: dict[str, Any] = {
        "status": BackupStatus.COMPLETED,
        "type": decision.type,
        "chain_id": decision.chain_id,
        "parent_id": decision.parent_id,
        "checkpoint_name": checkpoint,
        "size_bytes": sum(s.size for s in stored),
        "storage_id": storage_id,
        "completed_at": completed_at,
        "heartbeat_at": completed_at,
        "progress": 100,
    }
    if decision.reset_reason and (converted or decision.type == BackupType.FULL):
        values["chain_reset_reason"] = decision.reset_reason
    if converted:
        values["plan_reason"] = f"full backup: {decision.reset_reason}"
    done: Backup | None = await session.scalar(
        update(Backup)
        .where(Backup.id == backup_id, Backup.status == BackupStatus.IN_PROGRESS)
        .values(**values)
        .returning(Backup)
    )
    if done is None:
        raise TakenOver("The backup was taken over by another worker")
    if decision.type == BackupType.FULL and done.policy_id is not None:
        retention = await session.scalar(
            select(BackupPolicy.retention_count).where(BackupPolicy.id == done.policy_id)
        )
        if retention is not None:
            await apply_retention(session, done.instance_id, retention, decision.chain_id, jobs)
    await emit_backup(session, WebhookEvent.BACKUP_COMPLETED, done)
    await record_success(session, done)
    return done


async def _require_parent(
    session: AsyncSession, decision: Decision, storage_id: uuid.UUID | None
) -> None:
    """No completed incremental whose chain cannot be restored from where it says."""
    chain_storage = await session.scalar(
        select(BackupChain.storage_id).where(BackupChain.id == decision.chain_id)
    )
    if chain_storage != storage_id:
        raise ChainUnreachable(
            "The hypervisor's backup storage changed during the backup, so the chain's earlier "
            "backups are on another storage; the next run takes a full"
        )
    parent = await session.scalar(select(Backup.status).where(Backup.id == decision.parent_id))
    missing = await session.scalar(
        select(Backup.id)
        .where(Backup.chain_id == decision.chain_id, Backup.files_missing_at.is_not(None))
        .limit(1)
    )
    if parent != BackupStatus.COMPLETED or missing is not None:
        raise ChainUnreachable(
            "The backup this incremental builds on is no longer available; the next run "
            "takes a full"
        )


async def apply_retention(
    session: AsyncSession,
    instance_id: uuid.UUID,
    retention_count: int,
    current_chain_id: uuid.UUID,
    jobs: JobQueue,
) -> list[uuid.UUID]:
    """After a full completed: the oldest completed chains beyond the count go, whole."""
    doomed = chains_to_delete(
        await completed_chains(session, instance_id), retention_count, current_chain_id
    )
    if not doomed:
        return []
    backup_ids = list(
        (
            await session.scalars(
                select(Backup.id).where(
                    Backup.chain_id.in_(doomed), Backup.status != BackupStatus.DELETING
                )
            )
        ).all()
    )
    await mark_for_deletion(session, backup_ids, jobs)
    return backup_ids


async def mark_for_deletion(
    session: AsyncSession, backup_ids: list[uuid.UUID], jobs: JobQueue
) -> None:
    """Rows stay (status 'deleting') until the deletion job has removed their files."""
    await session.execute(
        update(Backup)
        .where(Backup.id.in_(backup_ids))
        .values(status=BackupStatus.DELETING, progress=None)
    )
    for backup_id in backup_ids:
        enqueue_deletion(jobs, backup_id)


async def remove_instance(session: AsyncSession, instance_id: uuid.UUID) -> None:
    """An instance without backups goes with the records that name it: its restores (their
    history ends with it), its empty chains and its disks."""
    await session.execute(delete(Restore).where(Restore.instance_id == instance_id))
    await session.execute(delete(BackupChain).where(BackupChain.instance_id == instance_id))
    await session.execute(delete(Instance).where(Instance.id == instance_id))


async def remove_instance_when_emptied(session: AsyncSession, instance_id: uuid.UUID) -> bool:
    """After a deletion job removed a backup: an instance deleted with its backups goes when
    none is left. Each job asks after committing its own removal, under the instance's lock,
    so whichever removes the last backup sees none left."""
    deleting = await session.scalar(
        select(Instance.id)
        .where(Instance.id == instance_id, Instance.deleting_at.is_not(None))
        .with_for_update()
    )
    if deleting is None:
        return False
    left = await session.scalar(
        select(func.count()).select_from(Backup).where(Backup.instance_id == instance_id)
    )
    if left:
        return False
    await remove_instance(session, instance_id)
    return True


async def remove_emptied_instances(session: AsyncSession) -> list[uuid.UUID]:
    """The tick's sweep: an instance deleted with its backups whose last deletion job removed
    its backup but died before removing the instance (worker killed between the two commits)."""
    emptied = await session.scalars(
        select(Instance.id).where(
            Instance.deleting_at.is_not(None),
            ~select(Backup.id).where(Backup.instance_id == Instance.id).exists(),
        )
    )
    return [i for i in list(emptied) if await remove_instance_when_emptied(session, i)]


async def record_failure(
    session: AsyncSession, backup: Backup, message: str, now: datetime
) -> None:
    """A failed backup is reported (backup.failed) and turns its policy to Error with the
    reason, in the operator's words; the policy's next run is planned again (after a failed full
    it takes a full, whatever the day)."""
    await emit_backup(session, WebhookEvent.BACKUP_FAILED, backup)
    if backup.policy_id is None:
        return
    name = await session.scalar(select(Instance.name).where(Instance.id == backup.instance_id))
    await policy_errored(session, backup.policy_id, f"{name}: {message}", now)
    await refresh_next_run(session, backup.policy_id, now)


async def record_success(session: AsyncSession, backup: Backup) -> None:
    """A completed backup, scheduled or "Backup now", is the instance's new recovery point and
    may end its policy's Error. A "Backup now" also moves the next run (a full it lacked is
    made); the tick planned a scheduled one's as if it would complete."""
    assert backup.completed_at is not None
    await evaluate_protection(session, backup.completed_at, instance_ids=[backup.instance_id])
    policy_id = await session.scalar(
        select(Instance.backup_policy_id).where(Instance.id == backup.instance_id)
    )
    if policy_id is not None:
        await policy_recovered(session, policy_id, backup.completed_at)
        if backup.manual:
            await refresh_next_run(session, policy_id, backup.completed_at)


async def _fail_stale(
    session: AsyncSession,
    model: type[Backup] | type[Restore],
    now: datetime,
    stale_after: timedelta,
    start_within: timedelta,
    messages: tuple[str, str],
) -> list[Any]:
    """Fail rows of `model` in progress without a heartbeat, or pending for too long."""
    failed: list[Any] = []
    for status, limit, column, message in (
        (BackupStatus.IN_PROGRESS, stale_after, model.heartbeat_at, messages[0]),
        (BackupStatus.PENDING, start_within, model.created_at, messages[1]),
    ):
        failed += (
            await session.scalars(
                update(model)
                .where(model.status == status, column < now - limit)
                .values(status=BackupStatus.FAILED, error=message, completed_at=now, progress=None)
                .returning(model)
            )
        ).all()
    return failed


async def reap_stale(
    session: AsyncSession, now: datetime, stale_after: timedelta, start_within: timedelta
) -> list[uuid.UUID]:
    """Fail backups whose worker vanished, so an instance is never blocked forever."""
    backups = await _fail_stale(
        session, Backup, now, stale_after, start_within, (WORKER_LOST, NEVER_STARTED)
    )
    for backup in backups:
        await record_failure(session, backup, backup.error, now)
    return [b.id for b in backups]


async def reap_stale_restores(
    session: AsyncSession, now: datetime, stale_after: timedelta, start_within: timedelta
) -> list[uuid.UUID]:
    """Fail restores whose worker vanished: a stuck restore would block the instance's backups."""
    restores = await _fail_stale(
        session,
        Restore,
        now,
        stale_after,
        start_within,
        (RESTORE_WORKER_LOST, RESTORE_NEVER_STARTED),
    )
    for restore in restores:
        await emit_restore(session, WebhookEvent.RESTORE_FAILED, restore)
    return [r.id for r in restores]


# Long enough for the request or tick that created a row to have sent its job.
REDISPATCH_AFTER = timedelta(minutes=1)
REDISPATCH_BATCH = 500


async def redispatch_lost_jobs(session: AsyncSession, jobs: JobQueue, now: datetime) -> int:
    """Send again the jobs of rows still waiting for one: an enqueue lost to a Redis outage,
    or a crash between a commit and its enqueue, only delays the work.

    Fixed job ids make arq drop the copies of jobs still queued, running or just finished, and
    every job claims its row with a conditional UPDATE, so a second delivery is harmless.
    Deletions are sent again only before their first attempt (later ones back off on purpose).
    """
    cutoff = now - REDISPATCH_AFTER
    backups = await _waiting(session, Backup, cutoff)
    restores = await _waiting(session, Restore, cutoff)
    deletions = (
        await session.scalars(
            select(Backup.id)
            .where(Backup.status == BackupStatus.DELETING, Backup.delete_attempts == 0)
            .limit(REDISPATCH_BATCH)
        )
    ).all()
    for backup_id, hypervisor_id in backups:
        enqueue_backup(jobs, backup_id, hypervisor_id)
    for restore_id, hypervisor_id in restores:
        enqueue_restore(jobs, restore_id, hypervisor_id)
    for backup_id in deletions:
        enqueue_deletion(jobs, backup_id)
    return len(backups) + len(restores) + len(deletions)


async def _waiting(
    session: AsyncSession, model: type[Backup] | type[Restore], cutoff: datetime
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(row id, hypervisor id) of rows pending since before the cutoff, oldest first."""
    rows = await session.execute(
        select(model.id, Instance.hypervisor_id)
        .join(Instance, Instance.id == model.instance_id)
        .where(model.status == BackupStatus.PENDING, model.created_at < cutoff)
        .order_by(model.created_at)
        .limit(REDISPATCH_BATCH)
    )
    return [(row_id, hypervisor_id) for row_id, hypervisor_id in rows]
