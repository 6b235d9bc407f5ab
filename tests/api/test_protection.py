"""Recovery-point objective: each instance's last good backup against its policy's expected
interval, evaluated with a controllable clock; its changes recorded; the API's counts and
filter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.engine.protection import evaluate_protection
from app.models import Instance, ProtectionChange
from tests.api.helpers import user_with_headers
from tests.factories import create_backup, create_instance, create_policy, create_user
from tests.worker.standin import complete_pending

GRACE = timedelta(hours=6)
T0 = datetime(2026, 6, 1, 2, 5, tzinfo=UTC)


async def _changes(
    session: AsyncSession, instance: Instance
) -> list[tuple[str | None, str | None]]:
    rows = await session.execute(
        select(ProtectionChange.from_state, ProtectionChange.to_state)
        .where(ProtectionChange.instance_id == instance.id)
        .order_by(ProtectionChange.changed_at)
    )
    return [(a, b) for a, b in rows]


async def _state(session: AsyncSession, instance: Instance) -> tuple[str | None, datetime | None]:
    await session.refresh(instance)
    return instance.protection, instance.protection_since


async def test_daily_policy_protected_then_at_risk_after_a_day_and_the_grace_then_restored(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    owner = await create_user(session)
    policy = await create_policy(session, owner)  # daily
    instance = await create_instance(session, owner, backup_policy_id=policy.id)
    await session.flush()

    await evaluate_protection(session, T0 - timedelta(hours=1), GRACE)
    assert await _state(session, instance) == ("unprotected", T0 - timedelta(hours=1))

    # A backup completes at T0: it is evaluated at once, at its completion time.
    await create_backup(session, instance, status="pending", completed_at=None, created_at=T0)
    await session.commit()
    await complete_pending(sessionmaker, T0)
    assert await _state(session, instance) == ("protected", T0)
    assert instance.last_good_backup_at == T0

    # 1 day + 6 hours of grace: still protected at the limit, at risk a minute later.
    await evaluate_protection(session, T0 + timedelta(hours=30), GRACE)
    assert await _state(session, instance) == ("protected", T0)
    late = T0 + timedelta(hours=30, minutes=1)
    changed = await evaluate_protection(session, late, GRACE)
    assert [(c.instance_id, c.before, c.after) for c in changed] == [
        (instance.id, "protected", "at_risk")
    ]
    assert await _state(session, instance) == ("at_risk", late)
    # Evaluating again records nothing more.
    assert await evaluate_protection(session, late + timedelta(minutes=1), GRACE) == []

    # A failed backup is no recovery point; a completed one restores protection.
    await create_backup(session, instance, status="failed", completed_at=late, created_at=late)
    assert await evaluate_protection(session, late + timedelta(minutes=2), GRACE) == []
    back = late + timedelta(hours=1)
    await create_backup(session, instance, status="pending", completed_at=None, created_at=back)
    await session.commit()
    await complete_pending(sessionmaker, back)
    assert await _state(session, instance) == ("protected", back)
    assert await _changes(session, instance) == [
        (None, "unprotected"),
        ("unprotected", "protected"),
        ("protected", "at_risk"),
        ("at_risk", "protected"),
    ]


async def test_weekly_full_only_expects_a_week_and_the_grace(session: AsyncSession) -> None:
    owner = await create_user(session)
    policy = await create_policy(
        session, owner, frequency="weekly", day_of_week="monday", max_incremental_chain=0
    )
    instance = await create_instance(session, owner, backup_policy_id=policy.id)
    await create_backup(session, instance, completed_at=T0, created_at=T0)
    await evaluate_protection(session, T0 + timedelta(days=7, hours=6), GRACE)
    assert (await _state(session, instance))[0] == "protected"
    await evaluate_protection(session, T0 + timedelta(days=7, hours=6, seconds=1), GRACE)
    assert (await _state(session, instance))[0] == "at_risk"
    # Without grace it would have been at risk a week after.
    other = await create_instance(session, owner, backup_policy_id=policy.id)
    await create_backup(session, other, completed_at=T0, created_at=T0)
    await evaluate_protection(session, T0 + timedelta(days=7, seconds=1), timedelta(0))
    assert (await _state(session, other))[0] == "at_risk"


async def test_missing_files_are_no_recovery_point_and_leaving_the_policy_ends_measuring(
    session: AsyncSession,
) -> None:
    owner = await create_user(session)
    policy = await create_policy(session, owner)
    instance = await create_instance(session, owner, backup_policy_id=policy.id)
    await create_backup(session, instance, completed_at=T0, files_missing_at=T0)
    await evaluate_protection(session, T0, GRACE)
    assert (await _state(session, instance))[0] == "unprotected"
    assert instance.last_good_backup_at is None

    instance.backup_policy_id = None
    await session.flush()
    await evaluate_protection(session, T0 + timedelta(minutes=1), GRACE)
    assert await _state(session, instance) == (None, None)
    assert (await _changes(session, instance))[-1] == ("unprotected", None)


async def test_policy_counts_and_instances_filter_show_at_risk_instances(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    policy = await create_policy(session, user)
    fresh, stale, _never = [
        await create_instance(session, user, name=name, backup_policy_id=policy.id)
        for name in ("fresh", "stale", "never")
    ]
    now = datetime.now(UTC)
    await create_backup(session, fresh, completed_at=now - timedelta(hours=2))
    await create_backup(session, stale, completed_at=now - timedelta(days=3))
    someone_else = await create_user(session)
    theirs = await create_instance(session, someone_else)
    their_policy = await create_policy(session, someone_else)
    theirs.backup_policy_id = their_policy.id
    await session.flush()
    await evaluate_protection(session, now, GRACE)

    read = (await client.get(f"/backup-policies/{policy.id}", headers=headers)).json()
    assert (read["at_risk_count"], read["unprotected_count"]) == (1, 1)
    assert read["expected_backup_interval_hours"] == 30
    listed = (await client.get("/backup-policies", headers=headers)).json()["items"]
    assert [(p["id"], p["at_risk_count"]) for p in listed] == [(str(policy.id), 1)]

    at_risk = (await client.get("/instances?protection=at_risk", headers=headers)).json()
    assert [i["name"] for i in at_risk["items"]] == ["stale"]
    assert at_risk["items"][0]["protection_since"] is not None
    unprotected = (await client.get("/instances?protection=unprotected", headers=headers)).json()
    assert [i["name"] for i in unprotected["items"]] == ["never"]  # not someone else's
    one = (await client.get(f"/instances/{fresh.id}", headers=headers)).json()
    assert one["protection"] == "protected" and one["last_good_backup_at"] is not None
