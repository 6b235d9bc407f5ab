"""A policy's state as its owner reads it: going to Error, recovering from it, and the next
run that takes a backup.

`policy_errored` and `policy_recovered` are the only places a policy enters or leaves Error:
whatever must follow such a change (a notification) belongs there.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ColumnElement, and_, not_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.engine.chains import chain_states
from app.engine.webhooks.events import emit_policy
from app.models import Backup, BackupPolicy, Hypervisor, Instance, User
from app.scheduling import ChainState, next_backup_at
from app.values import BackupStatus, PolicyStatus, WebhookEvent

# Refusals of a backup job. OVERLAP (two backups queued at once) is not an error of the policy
# and says nothing of the instance's health, so the recovery rule looks past it.
OVERLAP = "Skipped: another backup of this instance was already running"
RESTORE_RUNNING = "A restore of this instance is in progress"
REFUSALS = (OVERLAP,)


async def policy_errored(
    session: AsyncSession, policy_id: uuid.UUID, message: str, now: datetime
) -> bool:
    """A backup of the policy failed: it shows Error with the reason (a paused policy stays
    paused). True when the policy was not in Error before (policy.error is sent)."""
    before = await session.scalar(
        select(BackupPolicy.status).where(BackupPolicy.id == policy_id).with_for_update()
    )
    if before is None or before == PolicyStatus.PAUSED:
        return False
    policy = await session.scalar(
        update(BackupPolicy)
        .where(BackupPolicy.id == policy_id)
        .values(
            status=PolicyStatus.ERROR,
            last_error=message,
            last_error_at=now,
            last_error_resolved_at=None,
        )
        .returning(BackupPolicy)
        .execution_options(populate_existing=True)
    )
    if before == PolicyStatus.ERROR or policy is None:
        return False
    await emit_policy(session, WebhookEvent.POLICY_ERROR, policy)
    return True


async def policy_recovered(session: AsyncSession, policy_id: uuid.UUID, now: datetime) -> bool:
    """An Error policy goes back to Active when the most recent backup of every attached
    instance, scheduled or "Backup now", has completed. The error stays readable as the last
    one, with when it was resolved. True when the policy recovered now (policy.recovered is
    sent)."""
    status = await session.scalar(
        select(BackupPolicy.status).where(BackupPolicy.id == policy_id).with_for_update()
    )
    if status != PolicyStatus.ERROR:
        return False
    newest = (
        select(Backup.status)
        .where(
            Backup.instance_id == Instance.id,
            Backup.status != BackupStatus.DELETING,
            not_(and_(Backup.status == BackupStatus.FAILED, Backup.error.in_(REFUSALS))),
        )
        .order_by(Backup.created_at.desc(), Backup.id.desc())
        .limit(1)
        .correlate(Instance)
        .scalar_subquery()
    )
    outcomes = (
        await session.scalars(select(newest).where(Instance.backup_policy_id == policy_id))
    ).all()
    if any(outcome != BackupStatus.COMPLETED for outcome in outcomes):
        return False
    policy = await session.scalar(
        update(BackupPolicy)
        .where(BackupPolicy.id == policy_id)
        .values(status=PolicyStatus.ACTIVE, last_error_resolved_at=now)
        .returning(BackupPolicy)
        .execution_options(populate_existing=True)
    )
    if policy is not None:
        await emit_policy(session, WebhookEvent.POLICY_RECOVERED, policy)
    return True


async def instance_left(session: AsyncSession, policy_id: uuid.UUID, now: datetime) -> None:
    """An instance left the policy (detached or deleted): it may have been the one keeping the
    policy in Error, and the next run is planned from the instances that stay."""
    await session.flush()
    await policy_recovered(session, policy_id, now)
    await refresh_next_run(session, policy_id, now)


async def refresh_policies_of(
    session: AsyncSession, instances: ColumnElement[bool], now: datetime
) -> None:
    """Something the chains depend on changed for these instances (their hypervisor's storage,
    their hypervisor, their files found missing or back): their policies' next run is planned
    again."""
    await session.flush()
    policy_ids = await session.scalars(
        select(Instance.backup_policy_id)
        .where(instances, Instance.backup_policy_id.is_not(None))
        .distinct()
    )
    for policy_id in list(policy_ids):
        if policy_id is not None:
            await refresh_next_run(session, policy_id, now)


async def refresh_next_run(session: AsyncSession, policy_id: uuid.UUID, now: datetime) -> None:
    """Set the policy's `next_run_at` from where each attached instance's chain stands now:
    after a failed full, a new instance or a restore, the next run takes a full whatever the
    day; otherwise a weekly policy may skip days."""
    row = (
        await session.execute(
            select(BackupPolicy, User.timezone)
            .join(User, User.id == BackupPolicy.owner_id)
            .where(BackupPolicy.id == policy_id)
        )
    ).first()
    if row is None:
        return
    policy, zone = row
    attached = (
        await session.execute(
            select(Instance.id, Hypervisor.backup_storage_id)
            .join(Hypervisor, Hypervisor.id == Instance.hypervisor_id)
            .where(Instance.backup_policy_id == policy_id)
        )
    ).all()
    chains = await chain_states(session, [instance_id for instance_id, _ in attached])
    states: list[ChainState | None] = [
        chains[instance_id].planning_state(policy.backup_device, storage_id)
        for instance_id, storage_id in attached
    ]
    policy.next_run_at = next_backup_at(
        policy.schedule, policy.max_incremental_chain, zone, now, states
    )
