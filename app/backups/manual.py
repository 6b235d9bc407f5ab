"""Backup now: a manual backup that follows the same chain rules as a scheduled one."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from app.backups.schemas import BackupRead
from app.backups.service import read_backup
from app.engine.chains import active_work, chain_states, planning_state
from app.errors import Conflict
from app.instances.service import get_instance
from app.models import Backup, BackupPolicy, User
from app.queues import JobQueue, enqueue_backup
from app.scheduling import Plan, Schedule, plan_backup
from app.values import Frequency

# Without a policy there is no chain length to respect: every manual backup is a full.
NO_POLICY = "no backup policy: a manual backup without one is always a full"


async def backup_now(
    session: AsyncSession, user: User, instance_id: uuid.UUID, force_full: bool, jobs: JobQueue
) -> BackupRead:
    # The instance row lock serialises concurrent requests (Backup now, restore) per instance.
    instance = await get_instance(session, user, instance_id, for_update=True)
    if instance.status != "deployed":
        raise Conflict(f"Instance is {instance.status}")
    busy = await active_work(session, instance.id)
    if busy is not None:
        raise Conflict(f"{busy}; try again when it has finished")
    policy = (
        await session.get(BackupPolicy, instance.backup_policy_id)
        if instance.backup_policy_id
        else None
    )
    device = policy.backup_device if policy is not None else "primary"
    chain = (await chain_states(session, [instance.id]))[instance.id]
    state = planning_state(chain, device)
    now = datetime.now(UTC)
    if policy is None and not force_full:
        plan = Plan("full", NO_POLICY)
    else:
        # A daily-like decision: incremental while the chain has room, else a new full.
        plan = plan_backup(
            Schedule(Frequency.DAILY, 0),
            policy.max_incremental_chain if policy is not None else 0,
            state,
            now.date(),
            force_full=force_full,
        )
    backup = Backup(
        id=uuid.uuid4(),
        instance_id=instance.id,
        policy_id=policy.id if policy is not None else None,
        type="incremental" if plan.kind == "incremental" else "full",
        status="pending",
        manual=True,
        backup_device=device,
        scheduled_for=now,
        created_at=now,
        plan_reason=plan.reason,
        chain_reset_reason=state.reset_reason if state and not state.base_usable else None,
    )
    session.add(backup)
    await session.flush()
    enqueue_backup(jobs, backup.id, instance.hypervisor_id)
    return await read_backup(session, user, backup.id)
