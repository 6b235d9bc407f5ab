"""Recovery-point objective: is each instance's newest good backup as recent as its policy
promises?

Expected interval = the policy's longest gap between two runs that take a backup
(`longest_gap_days`: 1 day daily, 7 weekly full-only) + `IBP_RPO_GRACE_HOURS`. The last good
backup is the instance's newest completed backup of any kind whose files are not missing. An
instance without a policy has no expectation: its protection is NULL.

`evaluate_protection` runs every tick and after each completed backup; `protection_changed` is
the only place a state change is recorded, and so where whatever must follow one (a
notification) belongs.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import get_settings
from app.engine.webhooks.events import emit_protection
from app.models import Backup, BackupPolicy, Instance, ProtectionChange
from app.scheduling import Schedule, longest_gap_days
from app.values import BackupStatus, Frequency, Protection, WebhookEvent, Weekday

log = logging.getLogger(__name__)


def expected_interval(
    schedule: Schedule, max_incremental_chain: int, grace: timedelta
) -> timedelta:
    """How old the newest good backup of an instance of this policy may be."""
    return timedelta(days=longest_gap_days(schedule, max_incremental_chain)) + grace


def rpo_grace() -> timedelta:
    return timedelta(hours=get_settings().rpo_grace_hours)


def protection_of(last_good: datetime | None, expected: timedelta, now: datetime) -> Protection:
    if last_good is None:
        return Protection.UNPROTECTED
    return Protection.PROTECTED if now - last_good <= expected else Protection.AT_RISK


@dataclass(frozen=True)
class Change:
    instance_id: uuid.UUID
    policy_id: uuid.UUID | None
    before: str | None
    after: str | None
    last_good_backup_at: datetime | None


_last_good = (
    select(func.max(Backup.completed_at))
    .where(
        Backup.instance_id == Instance.id,
        Backup.status == BackupStatus.COMPLETED,
        Backup.files_missing_at.is_(None),
    )
    .correlate(Instance)
    .scalar_subquery()
)


async def evaluate_protection(
    session: AsyncSession,
    now: datetime,
    grace: timedelta | None = None,
    instance_ids: Collection[uuid.UUID] | None = None,
) -> list[Change]:
    """Evaluate every instance (or those given) at `now`; store what changed and return the
    changes of state.

    Nothing is locked while reading (a tick reads every instance); each write is conditional on
    the state it was computed from, so of two evaluations racing (the tick and a completion)
    only one records a given change, and the loser's instance is evaluated again next tick."""
    grace = rpo_grace() if grace is None else grace
    stmt = (
        select(
            Instance.id,
            Instance.backup_policy_id,
            Instance.protection,
            Instance.last_good_backup_at,
            BackupPolicy.frequency,
            BackupPolicy.hour,
            BackupPolicy.day_of_week,
            BackupPolicy.max_incremental_chain,
            _last_good.label("good"),
        )
        .outerjoin(BackupPolicy, BackupPolicy.id == Instance.backup_policy_id)
        .where(Instance.deleting_at.is_(None))
    )
    if instance_ids is not None:
        stmt = stmt.where(Instance.id.in_(list(instance_ids)))
    changes: list[Change] = []
    for row in (await session.execute(stmt)).all():
        state: Protection | None = None
        if row.backup_policy_id is not None:
            weekday = Weekday(row.day_of_week) if row.day_of_week is not None else None
            schedule = Schedule(Frequency(row.frequency), row.hour, weekday)
            expected = expected_interval(schedule, row.max_incremental_chain, grace)
            state = protection_of(row.good, expected, now)
        if state == row.protection and row.good == row.last_good_backup_at:
            continue
        values: dict[str, object] = {"last_good_backup_at": row.good}
        if state != row.protection:
            values |= {"protection": state, "protection_since": now if state else None}
        written = await session.scalar(
            update(Instance)
            .where(
                Instance.id == row.id,
                Instance.protection.is_not_distinct_from(row.protection),
                Instance.last_good_backup_at.is_not_distinct_from(row.last_good_backup_at),
            )
            .values(**values)
            .returning(Instance.id)
        )
        if written is not None and state != row.protection:
            change = Change(row.id, row.backup_policy_id, row.protection, state, row.good)
            await protection_changed(session, change, now)
            changes.append(change)
    return changes


async def protection_changed(session: AsyncSession, change: Change, now: datetime) -> None:
    """An instance's protection changed (to at_risk, back to protected, measured for the first
    time, or no longer measured when it left its policy): recorded here, once per change."""
    log.info(
        "instance %s: protection %s -> %s (last good backup %s)",
        change.instance_id,
        change.before,
        change.after,
        change.last_good_backup_at,
    )
    session.add(
        ProtectionChange(
            id=uuid.uuid4(),
            instance_id=change.instance_id,
            policy_id=change.policy_id,
            from_state=change.before,
            to_state=change.after,
            last_good_backup_at=change.last_good_backup_at,
            changed_at=now,
        )
    )
    await session.flush()
    event = _event(change.before, change.after)
    if event is not None:
        await emit_protection(
            session,
            event,
            change.instance_id,
            change.policy_id,
            change.before,
            change.after,
            change.last_good_backup_at,
        )


_UNSAFE = (Protection.AT_RISK, Protection.UNPROTECTED)


def _event(before: str | None, after: str | None) -> str | None:
    """Which webhook a change is: crossing between protected and not. at_risk: a protected
    instance falls behind or loses its last good backup, or is first measured behind;
    restored: protected again (or for the first time) after at_risk or unprotected. Moves
    between at_risk and unprotected, and leaving a policy, send nothing."""
    if after in _UNSAFE and (before == Protection.PROTECTED or after == Protection.AT_RISK):
        return None if before in _UNSAFE else WebhookEvent.PROTECTION_AT_RISK
    if after == Protection.PROTECTED and before in _UNSAFE:
        return WebhookEvent.PROTECTION_RESTORED
    return None
