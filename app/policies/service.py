"""Backup policies: ownership, schedule planning in the owner's zone, attachments."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any, TypeVarTuple

from pydantic_core import to_json
from sqlalchemy import Select, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.engine.policy_state import instance_left, refresh_next_run
from app.engine.protection import expected_interval, rpo_grace
from app.errors import Conflict, Forbidden, NotFound, Unprocessable
from app.instances.service import readable_instances
from app.models import BackupPolicy, Instance, User
from app.policies.schemas import PolicyCreate, PolicyRead, PolicySchedule, PolicyUpdate
from app.scheduling import (
    Schedule,
    next_backup_at,
    next_run_at,
    schedule_sentence,
    schedule_summary,
)
from app.schemas import PageParams
from app.values import Frequency, PolicyStatus, Protection, Weekday

Ts = TypeVarTuple("Ts")

ALREADY_ATTACHED = "Instance is already attached to another backup policy"


def _now() -> datetime:
    return datetime.now(UTC)


def plan_next_run(policy: BackupPolicy, zone: str, after: datetime | None = None) -> None:
    """A policy without instances: the tick looks at it on the next local day at the hour, and
    its next backup is the next run that takes one in steady state. With instances, follow
    with `refresh_next_run`, which plans from their chains."""
    after = after or _now()
    policy.next_check_at = next_run_at(policy.schedule, zone, after)
    policy.next_run_at = next_backup_at(policy.schedule, policy.max_incremental_chain, zone, after)


_policies, _users, _instances = BackupPolicy.__table__, User.__table__, Instance.__table__


def _attached_count(label: str, *where: Any) -> Any:
    return (
        select(func.count())
        .where(_instances.c.backup_policy_id == _policies.c.id, *where)
        .correlate(_policies)
        .scalar_subquery()
        .label(label)
    )


_instance_count = _attached_count("instance_count")
# Instances at risk or unprotected against the policy's expected interval (ix_instances_protection).
_COUNTS = (
    _instance_count,
    _attached_count("at_risk_count", _instances.c.protection == Protection.AT_RISK),
    _attached_count("unprotected_count", _instances.c.protection == Protection.UNPROTECTED),
)


@dataclass(frozen=True)
class _Reader:
    """A user as a statement parameter: `id` is a bound parameter, not a value."""

    id: Any
    is_admin: bool


def readable_policies(user: User | _Reader, stmt: Select[*Ts]) -> Select[*Ts]:
    """Every policy query goes through here: admins read all policies, users their own."""
    return stmt if user.is_admin else stmt.where(_policies.c.owner_id == user.id)


# A policy and its owner's zone: what an edit or a preview loads (a read: _READ_ROWS).
_POLICY_ROWS = select(BackupPolicy, User.timezone).join(User, User.id == BackupPolicy.owner_id)
# ... and what a read shows besides.
_READ_ROWS = select(BackupPolicy, User.timezone, *_COUNTS).join(
    User, User.id == BackupPolicy.owner_id
)


@lru_cache(maxsize=1024)
def _summary(frequency: str, hour: int, day_of_week: str | None) -> str:
    """Cached: a few hundred combinations exist at most."""
    weekday = Weekday(day_of_week) if day_of_week is not None else None
    return schedule_summary(Schedule(Frequency(frequency), hour, weekday))


@lru_cache(maxsize=4096)
def _sentence(
    frequency: str, hour: int, day_of_week: str | None, chain: int, zone: str, today: date
) -> str:
    """Cached per day: the clock changes it names are those of the coming year."""
    weekday = Weekday(day_of_week) if day_of_week is not None else None
    return schedule_sentence(Schedule(Frequency(frequency), hour, weekday), chain, zone, today)


def _interval_hours(frequency: str, hour: int, day_of_week: str | None, chain: int) -> float:
    weekday = Weekday(day_of_week) if day_of_week is not None else None
    schedule = Schedule(Frequency(frequency), hour, weekday)
    return expected_interval(schedule, chain, rpo_grace()) / timedelta(hours=1)


def _read_fields(row: Mapping[Any, Any]) -> dict[str, Any]:
    """PolicyRead's fields, from the policy's columns plus timezone and instance_count.

    Ids as text: pydantic-core infers asyncpg's own UUID type about 3x slower than it
    serializes a str, which costs more than the conversion."""
    frequency, hour, day_of_week = row["frequency"], row["hour"], row["day_of_week"]
    return {
        "id": str(row["id"]),
        "owner_id": str(row["owner_id"]),
        "name": row["name"],
        "status": row["status"],
        "schedule": {"frequency": frequency, "hour": hour, "day_of_week": day_of_week},
        "schedule_summary": _summary(frequency, hour, day_of_week),
        "schedule_description": _sentence(
            frequency,
            hour,
            day_of_week,
            row["max_incremental_chain"],
            row["timezone"],
            _now().date(),
        ),
        "timezone": row["timezone"],
        "max_incremental_chain": row["max_incremental_chain"],
        "retention_count": row["retention_count"],
        "backup_device": row["backup_device"],
        "instance_count": row["instance_count"],
        "at_risk_count": row["at_risk_count"],
        "unprotected_count": row["unprotected_count"],
        "expected_backup_interval_hours": _interval_hours(
            frequency, hour, day_of_week, row["max_incremental_chain"]
        ),
        "last_error": row["last_error"],
        "last_error_at": row["last_error_at"],
        "last_error_resolved_at": row["last_error_resolved_at"],
        "next_run_at": row["next_run_at"],
        "skipped_runs": row["skipped_runs"],
        "last_skip_reason": row["last_skip_reason"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


# What PolicyRead shows of a policy's own columns.
_READ_COLUMNS = tuple(
    c
    for c in _policies.c
    if c.key in PolicyRead.model_fields or c.key in PolicySchedule.model_fields
)
_NEWEST_FIRST = (_policies.c.created_at.desc(), _policies.c.id.desc())


# The list's shapes are built once per role and filters, the reader and the filters as bound
# parameters: SQLAlchemy then reuses their compiled form instead of walking a new statement on
# every request.
@lru_cache(maxsize=16)
def _list_statements(admin: bool, by_owner: bool, by_status: bool) -> tuple[Select[Any], ...]:
    """The page (with its total) and the total alone, for one combination of role and filters.
    Only the columns PolicyRead shows, on the tables: SQLAlchemy skips its ORM steps."""
    reader = _Reader(bindparam("reader_id"), admin)
    filters = []
    if by_owner:
        filters.append(_policies.c.owner_id == bindparam("owner_id"))
    if by_status:
        filters.append(_policies.c.status == bindparam("status"))
    count = readable_policies(reader, select(func.count()).select_from(_policies)).where(*filters)
    rows = (
        readable_policies(reader, select(*_READ_COLUMNS, _users.c.timezone, *_COUNTS))
        .join_from(_policies, _users, _users.c.id == _policies.c.owner_id)
        .where(*filters)
        .add_columns(count.scalar_subquery().label("total"))
        .order_by(*_NEWEST_FIRST)
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
    )
    return rows, count


async def list_policies_json(
    session: AsyncSession,
    user: User,
    owner_id: uuid.UUID | None,
    status: str | None,
    page: PageParams,
) -> bytes:
    """The page as Page[PolicyRead]'s JSON. The busiest screen of the panel, so plain columns
    rather than ORM objects, the total in the same round trip (an uncorrelated subquery that
    PostgreSQL computes once; an empty page, offset past the end, asks for it separately), and
    one dump by pydantic-core without validating what PostgreSQL already typed (a test holds
    every item equal to the single read)."""
    rows_stmt, count_stmt = _list_statements(
        user.is_admin, owner_id is not None, status is not None
    )
    params = {
        "reader_id": user.id,
        "owner_id": owner_id,
        "status": status,
        "limit": page.limit,
        "offset": page.offset,
    }
    result = await session.execute(rows_stmt, params)
    keys = tuple(result.keys())
    rows = [dict(zip(keys, row, strict=True)) for row in result]
    total = rows[0]["total"] if rows else await session.scalar(count_stmt, params)
    items = [_read_fields(row) for row in rows]
    return to_json({"items": items, "total": total, "limit": page.limit, "offset": page.offset})


def to_read(policy: BackupPolicy, zone: str, *counts: int) -> PolicyRead:
    """`counts`: instance_count, at_risk_count, unprotected_count."""
    values = {c.key: getattr(policy, c.key) for c in _READ_COLUMNS}
    values |= {"timezone": zone} | dict(zip([c.name for c in _COUNTS], counts, strict=True))
    return PolicyRead(**_read_fields(values))


async def get_policy_row(
    session: AsyncSession, user: User, policy_id: uuid.UUID
) -> tuple[BackupPolicy, str]:
    row = (
        await session.execute(
            readable_policies(user, _POLICY_ROWS).where(BackupPolicy.id == policy_id)
        )
    ).first()
    if row is None:
        raise NotFound("Backup policy not found")
    return row[0], row[1]


async def get_policy(session: AsyncSession, user: User, policy_id: uuid.UUID) -> BackupPolicy:
    return (await get_policy_row(session, user, policy_id))[0]


async def read_policy(session: AsyncSession, user: User, policy_id: uuid.UUID) -> PolicyRead:
    return (await read_policy_and_row(session, user, policy_id))[1]


async def read_policy_and_row(
    session: AsyncSession, user: User, policy_id: uuid.UUID
) -> tuple[BackupPolicy, PolicyRead]:
    """The policy as loaded and as read, in one query."""
    await session.flush()
    row = (
        await session.execute(
            readable_policies(user, _READ_ROWS).where(BackupPolicy.id == policy_id)
        )
    ).first()
    if row is None:
        raise NotFound("Backup policy not found")
    return row[0], to_read(*row)


async def create_policy(session: AsyncSession, user: User, payload: PolicyCreate) -> PolicyRead:
    owner = user
    if payload.owner_id is not None and payload.owner_id != user.id:
        if not user.is_admin:
            raise Forbidden("You can only create policies for yourself")
        found = await session.get(User, payload.owner_id)
        if found is None:
            raise Unprocessable(
                "owner_id: no such user",
                errors=[{"field": "owner_id", "message": "no such user", "type": "reference"}],
            )
        owner = found
    policy = BackupPolicy(
        id=uuid.uuid4(),
        owner_id=owner.id,
        name=payload.name,
        frequency=payload.schedule.frequency,
        hour=payload.schedule.hour,
        day_of_week=payload.schedule.day_of_week,
        max_incremental_chain=payload.max_incremental_chain,
        retention_count=payload.retention_count,
        backup_device=payload.backup_device,
        status=PolicyStatus.ACTIVE,
        skipped_runs=0,
    )
    plan_next_run(policy, owner.timezone)
    session.add(policy)
    await session.flush()
    return await read_policy(session, user, policy.id)


async def update_policy(
    session: AsyncSession, user: User, policy_id: uuid.UUID, payload: PolicyUpdate
) -> PolicyRead:
    policy, zone = await get_policy_row(session, user, policy_id)
    replan = False
    if payload.name is not None:
        policy.name = payload.name
    if payload.schedule is not None:
        policy.frequency = payload.schedule.frequency
        policy.hour = payload.schedule.hour
        policy.day_of_week = payload.schedule.day_of_week
        replan = True
    if payload.max_incremental_chain is not None:
        replan = replan or payload.max_incremental_chain != policy.max_incremental_chain
        policy.max_incremental_chain = payload.max_incremental_chain
    if payload.retention_count is not None:
        policy.retention_count = payload.retention_count
    if payload.backup_device is not None:
        replan = replan or payload.backup_device != policy.backup_device
        policy.backup_device = payload.backup_device
    if payload.status is not None and payload.status != policy.status:
        # Resuming plans from now: a paused policy never fires a burst of missed runs.
        replan = replan or payload.status == PolicyStatus.ACTIVE
        policy.status = payload.status
    if replan:
        plan_next_run(policy, zone)
        await refresh_next_run(session, policy.id, _now())
    policy.updated_at = _now()
    return await read_policy(session, user, policy.id)


async def delete_policy(session: AsyncSession, user: User, policy_id: uuid.UUID) -> None:
    policy = await get_policy(session, user, policy_id)
    # Backups keep existing (policy_id becomes NULL); instances are detached by the same FK rule.
    await session.execute(
        update(Instance).where(Instance.backup_policy_id == policy.id).values(backup_policy_id=None)
    )
    await session.delete(policy)


async def replan_owner_policies(session: AsyncSession, owner: User) -> None:
    """The owner's zone changed: every policy's next run moves to the new local hour."""
    await session.flush()
    policies = await session.scalars(select(BackupPolicy).where(BackupPolicy.owner_id == owner.id))
    for policy in policies.all():
        plan_next_run(policy, owner.timezone)
        await refresh_next_run(session, policy.id, _now())


# --- attachments -----------------------------------------------------------------------------


def attached_instances(policy: BackupPolicy) -> Select[Instance]:
    return (
        select(Instance)
        .where(Instance.backup_policy_id == policy.id)
        .order_by(Instance.name, Instance.id)
    )


def attachable_instances(policy: BackupPolicy) -> Select[Instance]:
    return (
        select(Instance)
        .where(Instance.owner_id == policy.owner_id, Instance.backup_policy_id.is_(None))
        .order_by(Instance.name, Instance.id)
    )


async def attach_instance(
    session: AsyncSession, user: User, policy_id: uuid.UUID, instance_id: uuid.UUID
) -> tuple[Instance, bool]:
    """Attach; returns (instance, created). The database decides races: one UPDATE wins."""
    policy = await get_policy(session, user, policy_id)
    instance = await session.scalar(readable_instances(user).where(Instance.id == instance_id))
    if instance is None:
        raise NotFound("Instance not found")
    if instance.owner_id != policy.owner_id:
        raise Unprocessable(
            "instance_id: the instance belongs to another user than the policy's owner",
            errors=[
                {
                    "field": "instance_id",
                    "message": "the instance belongs to another user than the policy's owner",
                    "type": "owner_mismatch",
                }
            ],
        )
    if instance.backup_policy_id == policy.id:
        return instance, False
    claimed = await session.scalar(
        update(Instance)
        .where(Instance.id == instance.id, Instance.backup_policy_id.is_(None))
        .values(backup_policy_id=policy.id, updated_at=_now())
        .returning(Instance.id)
    )
    if claimed is None:
        await session.refresh(instance)
        if instance.backup_policy_id == policy.id:
            return instance, False
        raise Conflict(ALREADY_ATTACHED)
    await session.refresh(instance)
    # An instance without a usable full takes one on the next run, whatever the day.
    await refresh_next_run(session, policy.id, _now())
    return instance, True


async def detach_instance(
    session: AsyncSession, user: User, policy_id: uuid.UUID, instance_id: uuid.UUID
) -> None:
    policy = await get_policy(session, user, policy_id)
    detached = await session.scalar(
        update(Instance)
        .where(Instance.id == instance_id, Instance.backup_policy_id == policy.id)
        .values(backup_policy_id=None, updated_at=_now())
        .returning(Instance.id)
    )
    if detached is None:
        raise NotFound("Instance is not attached to this policy")
    await instance_left(session, policy.id, _now())
