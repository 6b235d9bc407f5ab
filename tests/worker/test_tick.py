"""The scheduler tick against real PostgreSQL with a controllable clock."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from arq.connections import ArqRedis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.models import Backup, BackupChain, BackupPolicy, Instance
from app.queues import hypervisor_queue
from app.scheduling import run_on_local_date
from tests.factories import create_instance, create_policy, create_user
from tests.worker.standin import complete_pending
from worker.tasks.tick import run_tick

GRACE = timedelta(hours=6)


@pytest.fixture
def sessionmaker(committed_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Real transactions: the tick commits, and racing ticks need separate connections."""
    return async_sessionmaker(committed_engine, expire_on_commit=False, autoflush=False)


@pytest.fixture
async def session(sessionmaker: async_sessionmaker[AsyncSession]):  # type: ignore[no-untyped-def]
    async with sessionmaker() as s:
        yield s


DUE = datetime(2026, 6, 1, 2, tzinfo=UTC)


async def _attached(session: AsyncSession, **policy: object) -> tuple[BackupPolicy, Instance]:
    """An owner's policy, due at DUE unless told otherwise, with one instance attached."""
    owner = await create_user(session)
    instance = await create_instance(session, owner)
    created = await create_policy(session, owner, **{"next_run_at": DUE, **policy})
    instance.backup_policy_id = created.id
    await session.commit()
    return created, instance


def _ticks(start: datetime, days: int, runs: list[datetime]) -> list[datetime]:
    """Every 2 hours, plus every minute from 3 minutes before to 3 after each run."""
    end = start + timedelta(days=days)
    ticks = set()
    t = start
    while t < end:
        ticks.add(t)
        t += timedelta(hours=2)
    for run in runs:
        ticks.update(run + timedelta(minutes=m) for m in range(-3, 4))
    return sorted(x for x in ticks if start <= x < end)


async def _simulate(
    sessionmaker: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    *,
    zone: str,
    frequency: str,
    day_of_week: str | None,
    chain: int,
    retention: int,
    start: datetime,
    days: int,
    hour: int = 2,
) -> tuple[list[tuple[date, str]], list[int]]:
    owner = await create_user(session, timezone=zone)
    instance = await create_instance(session, owner)
    policy = await create_policy(
        session,
        owner,
        frequency=frequency,
        day_of_week=day_of_week,
        hour=hour,
        max_incremental_chain=chain,
        retention_count=retention,
        next_run_at=None,
    )
    from app.policies.service import plan_next_run

    plan_next_run(policy, zone, start)
    instance.backup_policy_id = policy.id
    await session.commit()

    tz = ZoneInfo(zone)
    local_days = [start.astimezone(tz).date() + timedelta(days=d) for d in range(-1, days + 1)]
    expected_runs = [r for d in local_days if (r := run_on_local_date(hour, zone, d)) is not None]
    runs: list[tuple[date, str]] = []
    chains_after_day: list[int] = []
    last_day = None
    for now in _ticks(start, days, expected_runs):
        tick = await run_tick(sessionmaker, None, now, GRACE)
        finished = await complete_pending(sessionmaker, now) if tick.dispatched else []
        for b in finished:
            local = b.scheduled_for.astimezone(tz)
            runs.append((local.date(), b.type))
            assert b.scheduled_for in expected_runs, f"run at {local} is not at the local hour"
        if last_day != now.date():
            last_day = now.date()
            async with sessionmaker() as s:
                chains_after_day.append(
                    await s.scalar(
                        select(func.count())
                        .select_from(BackupChain)
                        .where(BackupChain.instance_id == instance.id)
                    )
                    or 0
                )
    return runs, chains_after_day


def _types(runs: list[tuple[date, str]]) -> str:
    return "".join("F" if t == "full" else "I" for _, t in runs)


def _assert_one_run_per_day(runs: list[tuple[date, str]]) -> None:
    days = [d for d, _ in runs]
    assert len(days) == len(set(days)), "a local day got two runs"
    for a, b in itertools.pairwise(days):
        assert (b - a).days == 1, f"a local day was lost between {a} and {b}"


async def test_daily_chain_6_retention_3_for_60_days(sessionmaker, session) -> None:  # type: ignore[no-untyped-def]
    runs, chains = await _simulate(
        sessionmaker,
        session,
        zone="Europe/Berlin",
        frequency="daily",
        day_of_week=None,
        chain=6,
        retention=3,
        start=datetime(2026, 1, 5, tzinfo=UTC),
        days=60,
    )
    assert _types(runs) == ("F" + "I" * 6) * 8 + "F" + "I" * 3
    _assert_one_run_per_day(runs)
    assert max(chains) <= 3 + 1
    first_three = chains.index(3)
    assert all(c >= 3 for c in chains[first_three:])


async def test_daily_across_spring_forward_runs_every_local_day(sessionmaker, session) -> None:  # type: ignore[no-untyped-def]
    runs, _ = await _simulate(
        sessionmaker,
        session,
        zone="America/New_York",
        frequency="daily",
        day_of_week=None,
        chain=6,
        retention=3,
        start=datetime(2026, 2, 20, tzinfo=UTC),
        days=60,
    )
    _assert_one_run_per_day(runs)
    assert date(2026, 3, 8) in [d for d, _ in runs]  # 2:00 does not exist that day: runs at 3:00
    assert len(runs) == 60


async def test_daily_across_fall_back_runs_once_per_local_day(sessionmaker, session) -> None:  # type: ignore[no-untyped-def]
    runs, _ = await _simulate(
        sessionmaker,
        session,
        zone="America/New_York",
        frequency="daily",
        day_of_week=None,
        chain=6,
        retention=3,
        start=datetime(2026, 10, 10, tzinfo=UTC),
        days=60,
        hour=1,
    )
    _assert_one_run_per_day(runs)
    assert Counter(d for d, _ in runs)[date(2026, 11, 1)] == 1  # 1:00 happens twice that day


async def test_weekly_chain_6_full_on_monday_incrementals_between(sessionmaker, session) -> None:  # type: ignore[no-untyped-def]
    # 2026-01-07 is a Wednesday: the first backup is a full whatever the day.
    runs, chains = await _simulate(
        sessionmaker,
        session,
        zone="Asia/Kolkata",
        frequency="weekly",
        day_of_week="monday",
        chain=6,
        retention=3,
        start=datetime(2026, 1, 6, 18, tzinfo=UTC),
        days=60,
    )
    _assert_one_run_per_day(runs)
    fulls = [d for d, t in runs if t == "full"]
    assert fulls[0] == runs[0][0]
    assert all(d.weekday() == 0 for d in fulls[1:])
    assert _types(runs).startswith("FIIII" + "F" + "IIIIII" + "F")
    assert max(chains) <= 4


async def test_weekly_chain_2_skips_when_the_chain_is_full(sessionmaker, session) -> None:  # type: ignore[no-untyped-def]
    # Start on a Monday local (Sydney): Mon F, Tue I, Wed I, then nothing until Monday.
    runs, _ = await _simulate(
        sessionmaker,
        session,
        zone="Australia/Sydney",
        frequency="weekly",
        day_of_week="monday",
        chain=2,
        retention=2,
        start=datetime(2026, 3, 1, 14, tzinfo=UTC),
        days=60,
    )
    assert _types(runs) == "FII" * 8 + "F" + "II" or _types(runs).startswith("FIIFIIFII")
    fulls = [d for d, t in runs if t == "full"]
    assert all(d.weekday() == 0 for d in fulls)
    for d, t in runs:
        if t == "incremental":
            assert d.weekday() in (1, 2)


async def test_full_only_policy_takes_a_full_every_day(sessionmaker, session) -> None:  # type: ignore[no-untyped-def]
    runs, chains = await _simulate(
        sessionmaker,
        session,
        zone="UTC",
        frequency="daily",
        day_of_week=None,
        chain=0,
        retention=3,
        start=datetime(2026, 5, 1, tzinfo=UTC),
        days=20,
    )
    assert _types(runs) == "F" * 20
    assert max(chains) <= 4 and chains[-1] == 3


async def test_three_days_of_downtime_give_exactly_one_catch_up_run(sessionmaker, session) -> None:  # type: ignore[no-untyped-def]
    policy, _instance = await _attached(session, hour=2)

    await run_tick(sessionmaker, None, datetime(2026, 6, 1, 2, 0, tzinfo=UTC), GRACE)
    await complete_pending(sessionmaker, datetime(2026, 6, 1, 2, 5, tzinfo=UTC))
    # Down from 06-01 02:05 to 06-04 04:00: slots of 06-02, 06-03 and 06-04 were missed.
    back = datetime(2026, 6, 4, 4, 0, tzinfo=UTC)
    result = await run_tick(sessionmaker, None, back, GRACE)
    again = await run_tick(sessionmaker, None, back + timedelta(minutes=1), GRACE)
    assert len(result.dispatched) == 1 and not again.dispatched
    backups = (await session.scalars(select(Backup).order_by(Backup.created_at))).all()
    assert [b.scheduled_for for b in backups] == [
        datetime(2026, 6, 1, 2, tzinfo=UTC),
        datetime(2026, 6, 4, 2, tzinfo=UTC),
    ]
    await session.refresh(policy)
    assert policy.skipped_runs == 2
    assert policy.next_run_at == datetime(2026, 6, 5, 2, tzinfo=UTC)


async def test_missed_run_older_than_grace_is_skipped_and_recorded(sessionmaker, session) -> None:  # type: ignore[no-untyped-def]
    policy, _instance = await _attached(session, hour=2)
    result = await run_tick(sessionmaker, None, datetime(2026, 6, 1, 12, tzinfo=UTC), GRACE)
    assert not result.dispatched
    await session.refresh(policy)
    assert policy.skipped_runs == 1 and "missed" in (policy.last_skip_reason or "")
    assert policy.next_run_at == datetime(2026, 6, 2, 2, tzinfo=UTC)


async def test_paused_policy_dispatches_nothing(sessionmaker, session) -> None:  # type: ignore[no-untyped-def]
    _policy, _instance = await _attached(session, status="paused")
    result = await run_tick(sessionmaker, None, datetime(2026, 6, 1, 2, 1, tzinfo=UTC), GRACE)
    assert result.policies == 0 and not result.dispatched


async def test_suspended_instance_records_a_failed_backup_and_errors_the_policy(
    sessionmaker,
    session,  # type: ignore[no-untyped-def]
) -> None:
    owner = await create_user(session)
    good = await create_instance(session, owner, name="web-1")
    bad = await create_instance(session, owner, name="db-1", status="suspended")
    policy = await create_policy(session, owner, next_run_at=datetime(2026, 6, 1, 2, tzinfo=UTC))
    good.backup_policy_id = bad.backup_policy_id = policy.id
    await session.commit()
    await run_tick(sessionmaker, None, datetime(2026, 6, 1, 2, tzinfo=UTC), GRACE)
    failed = await session.scalar(select(Backup).where(Backup.instance_id == bad.id))
    assert (
        failed is not None and failed.status == "failed" and failed.error == "Instance is suspended"
    )
    await complete_pending(sessionmaker, datetime(2026, 6, 1, 2, 10, tzinfo=UTC))
    await session.refresh(policy)
    assert policy.status == "error" and policy.last_error == "db-1: Instance is suspended"

    # Next day the instance is back: a run where every backup completes sets Active again.
    bad.status = "deployed"
    await session.commit()
    await run_tick(sessionmaker, None, datetime(2026, 6, 2, 2, tzinfo=UTC), GRACE)
    await complete_pending(sessionmaker, datetime(2026, 6, 2, 2, 10, tzinfo=UTC))
    await session.refresh(policy)
    assert policy.status == "active"


async def test_error_policy_keeps_running_on_schedule(sessionmaker, session) -> None:  # type: ignore[no-untyped-def]
    _policy, _instance = await _attached(session, status="error", last_error="x")
    result = await run_tick(sessionmaker, None, datetime(2026, 6, 1, 2, tzinfo=UTC), GRACE)
    assert len(result.dispatched) == 1


async def test_overlapping_run_is_skipped_visibly(sessionmaker, session) -> None:  # type: ignore[no-untyped-def]
    policy, _instance = await _attached(session)
    await run_tick(sessionmaker, None, datetime(2026, 6, 1, 2, tzinfo=UTC), GRACE)
    # The first backup is still pending a day later (a very slow job): the next slot skips.
    result = await run_tick(sessionmaker, None, datetime(2026, 6, 2, 2, tzinfo=UTC), GRACE)
    assert not result.dispatched
    await session.refresh(policy)
    assert policy.skipped_runs == 1 and "still running" in (policy.last_skip_reason or "")


async def test_dispatch_enqueues_the_job_on_the_hypervisor_queue(
    sessionmaker,
    session,
    arq_redis: ArqRedis,  # type: ignore[no-untyped-def]
) -> None:
    _policy, instance = await _attached(session)
    result = await run_tick(sessionmaker, arq_redis, datetime(2026, 6, 1, 2, tzinfo=UTC), GRACE)
    (backup_id,) = result.dispatched
    jobs = await arq_redis.queued_jobs(queue_name=hypervisor_queue(instance.hypervisor_id))
    assert [(j.function, j.args, j.job_id) for j in jobs] == [
        ("run_backup", (str(backup_id),), f"backup:{backup_id}")
    ]


async def test_two_racing_ticks_dispatch_each_slot_once(committed_engine: AsyncEngine) -> None:
    maker = async_sessionmaker(committed_engine, expire_on_commit=False)
    due = datetime(2026, 6, 1, 2, tzinfo=UTC)
    async with maker() as session:
        owner = await create_user(session)
        instances = []
        for _ in range(40):
            policy = await create_policy(session, owner, next_run_at=due)
            for _ in range(3):
                instances.append(await create_instance(session, owner, backup_policy_id=policy.id))
        await session.commit()
    a, b = await asyncio.gather(
        run_tick(maker, None, due, GRACE), run_tick(maker, None, due, GRACE)
    )
    assert len(a.dispatched) + len(b.dispatched) == len(instances)
    assert not set(a.dispatched) & set(b.dispatched)
    async with maker() as session:
        per_instance = (
            await session.execute(
                select(Backup.instance_id, func.count()).group_by(Backup.instance_id)
            )
        ).all()
        assert len(per_instance) == len(instances) and all(n == 1 for _, n in per_instance)
        next_runs = set((await session.scalars(select(BackupPolicy.next_run_at))).all())
        assert next_runs == {due + timedelta(days=1)}


async def test_repeated_tick_is_harmless(sessionmaker, session) -> None:  # type: ignore[no-untyped-def]
    _policy, _instance = await _attached(session)
    for _ in range(2):
        await run_tick(sessionmaker, None, datetime(2026, 6, 1, 2, tzinfo=UTC), GRACE)
    count = await session.scalar(select(func.count()).select_from(Backup))
    assert count == 1
