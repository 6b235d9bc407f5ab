"""What a policy shows: the next run that takes a backup, Error and its recovery."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.engine.lifecycle import record_failure
from app.engine.policy_state import OVERLAP, refresh_next_run
from app.hypervisors.schemas import HypervisorUpdate
from app.hypervisors.service import update_hypervisor
from app.models import Backup, BackupPolicy, BackupStorage, Hypervisor, ProtectionChange
from tests.factories import create_backup, create_instance, create_policy, create_user
from tests.worker.standin import complete_pending
from worker.jobs import JobContext
from worker.tasks.control import tick
from worker.tasks.tick import run_tick

GRACE = timedelta(hours=6)
# Monday 2026-06-01, 1:00 AM in Paris (summer time) is 23:00 UTC on the Sunday.
MONDAY_RUN = datetime(2026, 5, 31, 23, tzinfo=UTC)


@pytest.fixture
def sessionmaker(committed_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(committed_engine, expire_on_commit=False, autoflush=False)


@pytest.fixture
async def session(sessionmaker: async_sessionmaker[AsyncSession]):  # type: ignore[no-untyped-def]
    async with sessionmaker() as s:
        yield s


async def _weekly_full_only(session: AsyncSession, instances: int = 1):  # type: ignore[no-untyped-def]
    owner = await create_user(session, timezone="Europe/Paris")
    policy = await create_policy(
        session,
        owner,
        frequency="weekly",
        day_of_week="monday",
        hour=1,
        max_incremental_chain=0,
        next_run_at=MONDAY_RUN,
    )
    made = []
    for n in range(instances):
        instance = await create_instance(session, owner, name=f"vm-{n}")
        instance.backup_policy_id = policy.id
        made.append(instance)
    await session.commit()
    return policy, made


async def test_weekly_full_only_shows_next_monday_after_its_run_not_tomorrow(
    sessionmaker: async_sessionmaker[AsyncSession], session: AsyncSession
) -> None:
    policy, _ = await _weekly_full_only(session)
    tick = await run_tick(sessionmaker, None, MONDAY_RUN, GRACE)
    assert len(tick.dispatched) == 1
    await session.refresh(policy)
    assert policy.next_run_at == datetime(2026, 6, 7, 23, tzinfo=UTC)  # next Monday 1:00 AM
    assert policy.next_check_at == datetime(2026, 6, 1, 23, tzinfo=UTC)  # the tick looks daily
    await complete_pending(sessionmaker, MONDAY_RUN + timedelta(minutes=5))

    # Tuesday's tick takes nothing and still shows Monday.
    tuesday = await run_tick(sessionmaker, None, datetime(2026, 6, 1, 23, tzinfo=UTC), GRACE)
    assert tuesday.policies == 1 and not tuesday.dispatched
    await session.refresh(policy)
    assert policy.next_run_at == datetime(2026, 6, 7, 23, tzinfo=UTC)


async def test_a_failed_full_makes_the_next_run_tomorrow(
    sessionmaker: async_sessionmaker[AsyncSession], session: AsyncSession
) -> None:
    policy, _ = await _weekly_full_only(session)
    await run_tick(sessionmaker, None, MONDAY_RUN, GRACE)
    failed_at = MONDAY_RUN + timedelta(minutes=10)
    async with sessionmaker() as s:
        backup = (
            await s.scalars(
                update(Backup)
                .values(status="failed", error="disk locked", completed_at=failed_at)
                .returning(Backup)
            )
        ).one()
        await record_failure(s, backup, "disk locked", failed_at)
        await s.commit()
    await session.refresh(policy)
    assert policy.status == "error" and policy.last_error == "vm-0: disk locked"
    assert policy.next_run_at == datetime(2026, 6, 1, 23, tzinfo=UTC)  # Tuesday: a full again
    # ... which the Tuesday tick takes.
    tuesday = await run_tick(sessionmaker, None, datetime(2026, 6, 1, 23, tzinfo=UTC), GRACE)
    assert len(tuesday.dispatched) == 1


async def test_backup_now_completing_the_missing_full_shows_next_monday_again(
    sessionmaker: async_sessionmaker[AsyncSession], session: AsyncSession
) -> None:
    """Attached without a full, the next run is tomorrow's (a full whatever the day); once
    "Backup now" has made that full, the next run is the policy's Monday again."""
    policy, (instance,) = await _weekly_full_only(session)
    attached = datetime(2026, 6, 2, 9, tzinfo=UTC)  # Tuesday
    await refresh_next_run(session, policy.id, attached)
    await session.commit()
    assert policy.next_run_at == datetime(2026, 6, 2, 23, tzinfo=UTC)  # Wednesday 1:00 AM
    await create_backup(
        session,
        instance,
        status="pending",
        manual=True,
        scheduled_for=attached,
        created_at=attached,
        completed_at=None,
    )
    await session.commit()
    await complete_pending(sessionmaker, attached + timedelta(minutes=3))
    await session.refresh(policy)
    assert policy.next_run_at == datetime(2026, 6, 7, 23, tzinfo=UTC)  # Monday 1:00 AM


async def test_error_policy_recovers_when_backup_now_completes_and_keeps_the_error_as_history(
    sessionmaker: async_sessionmaker[AsyncSession], session: AsyncSession
) -> None:
    policy, (instance,) = await _weekly_full_only(session)
    failed_at = datetime(2026, 6, 1, 0, tzinfo=UTC)
    failed = await create_backup(
        session, instance, status="failed", error="Instance is stopped", created_at=failed_at
    )
    await record_failure(session, failed, "Instance is stopped", failed_at)
    await session.commit()
    await session.refresh(policy)
    assert policy.status == "error" and policy.last_error_resolved_at is None

    # The customer starts the VM and clicks Backup now.
    clicked = failed_at + timedelta(hours=9)
    await create_backup(
        session,
        instance,
        status="pending",
        manual=True,
        scheduled_for=clicked,
        created_at=clicked,
        completed_at=None,
    )
    await session.commit()
    await complete_pending(sessionmaker, clicked + timedelta(minutes=3))
    await session.refresh(policy)
    assert policy.status == "active"
    assert policy.last_error == "vm-0: Instance is stopped"  # kept, as the last error
    assert policy.last_error_resolved_at == clicked + timedelta(minutes=3)

    # A new failure makes the error current again.
    again = clicked + timedelta(days=1)
    failed = await create_backup(session, instance, status="failed", error="x", created_at=again)
    await record_failure(session, failed, "x", again)
    await session.commit()
    await session.refresh(policy)
    assert policy.status == "error" and policy.last_error_resolved_at is None


async def test_error_stays_while_another_instances_most_recent_backup_failed(
    sessionmaker: async_sessionmaker[AsyncSession], session: AsyncSession
) -> None:
    policy, (good, bad) = await _weekly_full_only(session, instances=2)
    at = datetime(2026, 6, 1, 0, tzinfo=UTC)
    failed = await create_backup(session, bad, status="failed", error="boom", created_at=at)
    await record_failure(session, failed, "boom", at)
    later = at + timedelta(hours=1)
    await create_backup(session, good, status="pending", manual=True, created_at=later)
    await session.commit()
    await complete_pending(sessionmaker, later)
    await session.refresh(policy)
    assert policy.status == "error"

    # bad's Backup now completes: every instance's most recent backup has completed.
    await create_backup(session, bad, status="pending", manual=True, created_at=later)
    await session.commit()
    await complete_pending(sessionmaker, later + timedelta(minutes=5))
    await session.refresh(policy)
    assert policy.status == "active"


async def test_a_backup_refused_for_overlap_does_not_hold_the_policy_in_error(
    sessionmaker: async_sessionmaker[AsyncSession], session: AsyncSession
) -> None:
    policy, (instance,) = await _weekly_full_only(session)
    at = datetime(2026, 6, 1, 0, tzinfo=UTC)
    failed = await create_backup(session, instance, status="failed", error="boom", created_at=at)
    await record_failure(session, failed, "boom", at)
    clicked = at + timedelta(seconds=30)
    await create_backup(session, instance, status="pending", manual=True, created_at=clicked)
    # A scheduled run queued meanwhile was refused: newer, but it says nothing of the VM.
    await create_backup(
        session, instance, status="failed", error=OVERLAP, created_at=at + timedelta(minutes=1)
    )
    await session.commit()
    await complete_pending(sessionmaker, at + timedelta(minutes=5))
    assert (
        await session.scalar(select(BackupPolicy.status).where(BackupPolicy.id == policy.id))
    ) == ("active")


async def test_paused_policy_does_not_turn_to_error(
    sessionmaker: async_sessionmaker[AsyncSession], session: AsyncSession
) -> None:
    policy, (instance,) = await _weekly_full_only(session)
    policy.status = "paused"
    at = datetime(2026, 6, 1, 0, tzinfo=UTC)
    failed = await create_backup(session, instance, status="failed", error="boom", created_at=at)
    await record_failure(session, failed, "boom", at)
    await session.commit()
    await session.refresh(policy)
    assert policy.status == "paused" and policy.last_error is None


async def test_the_minute_tick_evaluates_protection_and_records_each_change_once(
    worker_ctx: JobContext, sessionmaker: async_sessionmaker[AsyncSession], session: AsyncSession
) -> None:
    owner = await create_user(session)
    policy = await create_policy(session, owner)  # daily: at risk after 30 hours
    stale = await create_instance(session, owner, backup_policy_id=policy.id)
    await create_backup(session, stale, completed_at=datetime.now(UTC) - timedelta(days=2))
    await session.commit()

    result = await tick(worker_ctx)
    assert "protection_changes=1" in result
    await session.refresh(stale)
    assert stale.protection == "at_risk"
    assert (await tick(worker_ctx)).endswith("protection_changes=0")
    changes = (
        await session.scalars(
            select(ProtectionChange.to_state).where(ProtectionChange.instance_id == stale.id)
        )
    ).all()
    assert changes == ["at_risk"]


async def test_a_new_storage_for_the_hypervisor_brings_the_next_full_forward(
    sessionmaker: async_sessionmaker[AsyncSession], session: AsyncSession
) -> None:
    """Its chain cannot go on on another storage: the next daily look takes a full, and the
    policy shows it at once instead of next Monday."""
    policy, (instance,) = await _weekly_full_only(session)
    await run_tick(sessionmaker, None, MONDAY_RUN, GRACE)
    await complete_pending(sessionmaker, MONDAY_RUN + timedelta(minutes=5))
    await session.refresh(policy)
    assert policy.next_run_at == datetime(2026, 6, 7, 23, tzinfo=UTC)  # next Monday

    storage = BackupStorage(id=uuid.uuid4(), name="other", kind="local", config={"path": "/x"})
    session.add(storage)
    await session.flush()
    hypervisor = await session.get(Hypervisor, instance.hypervisor_id)
    assert hypervisor is not None
    await update_hypervisor(session, hypervisor, HypervisorUpdate(backup_storage_id=storage.id))
    await session.commit()
    await session.refresh(policy)
    # The next 1:00 AM in Paris after now (the service's clock): a full, whatever the day.
    paris = datetime.now(ZoneInfo("Europe/Paris"))
    due = paris.replace(hour=1, minute=0, second=0, microsecond=0)
    if due <= paris:
        due += timedelta(days=1)
    assert policy.next_run_at == due.astimezone(UTC)
