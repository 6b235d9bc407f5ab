"""The scheduler tick: find due policies through the index, create their backups, advance.

It only decides and enqueues. Rows are claimed with FOR UPDATE SKIP LOCKED, backups are unique
per (instance, slot), and jobs are enqueued after the commit with a fixed job id, so a repeated
or concurrent tick never dispatches a slot twice.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import cast

from arq.connections import ArqRedis
from sqlalchemy import Table, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.engine.chains import chain_states
from app.engine.policy_state import policy_errored
from app.engine.webhooks.events import emit_backup, queue_delivery_if_emitted
from app.models import Backup, BackupPolicy, Hypervisor, Instance, User
from app.queues import JobQueue, enqueue_backup
from app.scheduling import (
    Chain,
    ChainState,
    missed_slot_action,
    next_backup_at,
    next_run_at,
    plan_backup,
    run_on_local_date,
    slot_local_date,
    state_after,
)
from app.values import BackupStatus, BackupType, InstanceStatus, PolicyStatus, WebhookEvent

BATCH = 500


@dataclass
class TickResult:
    policies: int = 0
    dispatched: list[uuid.UUID] = field(default_factory=list)
    skipped: int = 0


def _latest_run(policy: BackupPolicy, zone: str, now: datetime) -> datetime:
    """The most recent scheduled instant at or before now (the slot a catch-up would serve)."""
    schedule = policy.schedule
    day = slot_local_date(schedule, zone, now)
    run = run_on_local_date(policy.hour, zone, day)
    assert run is not None  # slot_local_date only returns days that have a run
    return run


def _skip(policy: BackupPolicy, reason: str, now: datetime, count: int = 1) -> None:
    policy.skipped_runs += count
    policy.last_skip_reason = reason
    policy.last_skip_at = now


async def _dispatch_batch(
    session: AsyncSession, now: datetime, grace: timedelta, jobs: JobQueue, result: TickResult
) -> int:
    rows = (
        await session.execute(
            select(BackupPolicy, User.timezone)
            .join(User, User.id == BackupPolicy.owner_id)
            .where(BackupPolicy.status != PolicyStatus.PAUSED, BackupPolicy.next_check_at <= now)
            .order_by(BackupPolicy.next_check_at)
            .limit(BATCH)
            .with_for_update(of=BackupPolicy, skip_locked=True)
        )
    ).all()
    if not rows:
        return 0
    policies = {policy.id: (policy, zone) for policy, zone in rows}
    instances = (
        await session.scalars(
            select(Instance)
            .where(Instance.backup_policy_id.in_(policies))
            .order_by(Instance.name, Instance.id)
        )
    ).all()
    by_policy: dict[uuid.UUID, list[Instance]] = {pid: [] for pid in policies}
    for instance in instances:
        assert instance.backup_policy_id is not None
        by_policy[instance.backup_policy_id].append(instance)
    chains = await chain_states(session, [i.id for i in instances])
    storage_of = dict(
        (
            await session.execute(
                select(Hypervisor.id, Hypervisor.backup_storage_id).where(
                    Hypervisor.id.in_({i.hypervisor_id for i in instances})
                )
            )
        )
        .tuples()
        .all()
    )

    new_backups: list[dict[str, object]] = []
    failures: list[tuple[uuid.UUID, str]] = []
    for policy, zone in policies.values():
        result.policies += 1
        assert policy.next_check_at is not None
        slot = _latest_run(policy, zone, now)
        # What each instance's chain will be once this run's backups are done: the policy's
        # next_run_at is the next run that takes a backup of one of them.
        after: dict[uuid.UUID, ChainState | None] = {
            i.id: chains[i.id].planning_state(policy.backup_device, storage_of[i.hypervisor_id])
            for i in by_policy[policy.id]
        }
        # After downtime only the newest missed run may still run (within the grace window);
        # the older ones are dropped and counted, never fired as a burst.
        missed = len(_runs_between(policy, zone, policy.next_check_at, slot))
        runs_now = missed_slot_action(slot, now, grace) == "run"
        if not runs_now:
            missed += 1
        if missed:
            _skip(policy, f"{missed} run(s) missed while the scheduler was down", now, missed)
            result.skipped += missed
        if runs_now:
            slot_date = slot_local_date(policy.schedule, zone, slot)
            for instance in by_policy[policy.id]:
                chain, storage = chains[instance.id], storage_of[instance.hypervisor_id]
                row = _plan_instance(policy, instance, chain, storage, slot, slot_date, now)
                if row is None:
                    if instance.status == InstanceStatus.DEPLOYED:
                        result.skipped += 1
                elif row["status"] == BackupStatus.FAILED:
                    failures.append((policy.id, f"{instance.name}: {row['error']}"))
                else:
                    chain_length = policy.max_incremental_chain
                    after[instance.id] = state_after(
                        policy.schedule, chain_length, after[instance.id], slot, zone
                    )
                if row is not None:
                    new_backups.append(row)
        policy.next_check_at = next_run_at(policy.schedule, zone, now)
        policy.next_run_at = next_backup_at(
            policy.schedule, policy.max_incremental_chain, zone, now, after.values()
        )
    await session.flush()
    for policy_id, message in failures:
        await policy_errored(session, policy_id, message, now)

    if new_backups:
        # One compiled statement, many parameter sets (insertmanyvalues): cheap at 1,000 rows.
        table = cast(Table, Backup.__table__)
        inserted = (
            await session.execute(
                insert(table)
                .on_conflict_do_nothing(constraint="uq_backups_instance_slot")
                .returning(table.c.id, table.c.instance_id, table.c.status),
                new_backups,
            )
        ).all()
        hypervisor_of = {i.id: i.hypervisor_id for i in instances}
        failed = []
        for backup_id, instance_id, status in inserted:
            if status == BackupStatus.PENDING:
                enqueue_backup(jobs, backup_id, hypervisor_of[instance_id])
                result.dispatched.append(backup_id)
            elif status == BackupStatus.FAILED:
                failed.append(backup_id)
        for backup in await session.scalars(select(Backup).where(Backup.id.in_(failed))):
            await emit_backup(session, WebhookEvent.BACKUP_FAILED, backup)
    return len(rows)


def _runs_between(
    policy: BackupPolicy, zone: str, start: datetime, end: datetime
) -> list[datetime]:
    runs, cursor = [], start
    while cursor < end:
        runs.append(cursor)
        cursor = next_run_at(policy.schedule, zone, cursor)
    return runs


def _plan_instance(
    policy: BackupPolicy,
    instance: Instance,
    chain: Chain,
    storage_id: uuid.UUID | None,
    slot: datetime,
    slot_date: date,
    now: datetime,
) -> dict[str, object] | None:
    """The backup row this slot creates for the instance, or None when it is skipped."""
    base: dict[str, object] = {
        # Every row carries every key: they go into one multi-row INSERT.
        "error": None,
        "completed_at": None,
        "plan_reason": None,
        "chain_reset_reason": None,
        "id": uuid.uuid4(),
        "instance_id": instance.id,
        "policy_id": policy.id,
        "scheduled_for": slot,
        "created_at": now,
        "backup_device": policy.backup_device,
        "manual": False,
    }
    if instance.status != InstanceStatus.DEPLOYED:
        message = f"Instance is {instance.status}"
        failed = {"type": BackupType.FULL, "status": BackupStatus.FAILED, "error": message}
        return {**base, **failed, "completed_at": now}
    if chain.busy:
        _skip(policy, f"{instance.name}: previous backup still running; this run was skipped", now)
        return None
    state = chain.planning_state(policy.backup_device, storage_id)
    plan = plan_backup(policy.schedule, policy.max_incremental_chain, state, slot_date)
    if plan.kind == "skip":
        return None
    return {
        **base,
        "type": plan.kind,
        "status": BackupStatus.PENDING,
        "plan_reason": plan.reason,
        "chain_reset_reason": state.reset_reason if state else None,
    }


async def run_tick(
    sessionmaker: async_sessionmaker[AsyncSession],
    redis: ArqRedis | None,
    now: datetime,
    grace: timedelta,
) -> TickResult:
    result = TickResult()
    while True:
        jobs = JobQueue()
        async with sessionmaker() as session:
            claimed = await _dispatch_batch(session, now, grace, jobs, result)
            await session.commit()
            queue_delivery_if_emitted(session, jobs)
        await jobs.flush(redis)
        if claimed < BATCH:
            return result
