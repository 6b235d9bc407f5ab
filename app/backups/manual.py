"""Backup now: a manual backup that follows the same chain rules as a scheduled one."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.backups.schemas import BackupRead
from app.backups.service import read_backup
from app.engine.chains import busy, chain_states
from app.errors import Conflict
from app.instances.service import get_instance
from app.models import Backup, BackupPolicy, Hypervisor, User
from app.queues import JobQueue, enqueue_backup
from app.scheduling import plan_now
from app.values import BackupDevice, BackupStatus, BackupType, InstanceStatus


async def backup_now(
    session: AsyncSession, user: User, instance_id: uuid.UUID, force_full: bool, jobs: JobQueue
) -> BackupRead:
    # The instance row lock serialises concurrent requests (Backup now, restore) per instance.
    instance = await get_instance(session, user, instance_id, for_update=True)
    if instance.status != InstanceStatus.DEPLOYED:
        raise Conflict(f"Instance is {instance.status}")
    if (work := await busy(session, instance.id)) is not None:
        raise Conflict(f"{work}; try again when it has finished")
    policy = (
        await session.get(BackupPolicy, instance.backup_policy_id)
        if instance.backup_policy_id
        else None
    )
    device = policy.backup_device if policy is not None else BackupDevice.PRIMARY
    storage_id = await session.scalar(
        select(Hypervisor.backup_storage_id).where(Hypervisor.id == instance.hypervisor_id)
    )
    chain = (await chain_states(session, [instance.id]))[instance.id]
    state = chain.planning_state(device, storage_id)
    now = datetime.now(UTC)
    plan = plan_now(policy.max_incremental_chain if policy else None, state, force_full)
    backup = Backup(
        id=uuid.uuid4(),
        instance_id=instance.id,
        policy_id=policy.id if policy is not None else None,
        type=BackupType.INCREMENTAL if plan.kind == "incremental" else BackupType.FULL,
        status=BackupStatus.PENDING,
        manual=True,
        backup_device=device,
        scheduled_for=now,
        created_at=now,
        plan_reason=plan.reason,
        chain_reset_reason=state.reset_reason if state else None,
    )
    session.add(backup)
    await session.flush()
    enqueue_backup(jobs, backup.id, instance.hypervisor_id)
    return await read_backup(session, user, backup.id)
