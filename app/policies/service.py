"""Backup policies: ownership, schedule planning in the owner's zone, attachments."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Hashable
from contextlib import nullcontext
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from pydantic_core import to_json
from sqlalchemy import Select, Uuid, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.service import Principal
from app.cache import Tag
from app.deps import Reads
from app.errors import Conflict, Forbidden, NotFound, Unprocessable
from app.models import BackupPolicy, Instance, User
from app.policies.schemas import PolicyCreate, PolicyRead, PolicyUpdate
from app.scheduling import Schedule, next_run_at, schedule_summary
from app.schemas import PageParams
from app.values import PolicyStatus

ALREADY_ATTACHED = "Instance is already attached to another backup policy"


def _now() -> datetime:
    return datetime.now(UTC)


def plan_next_run(policy: BackupPolicy, zone: str, after: datetime | None = None) -> None:
    policy.next_run_at = next_run_at(policy.schedule, zone, after or _now())


_instance_count = (
    select(func.count())
    .where(Instance.backup_policy_id == BackupPolicy.id)
    .correlate(BackupPolicy)
    .scalar_subquery()
)


def readable_policies(user: User) -> Select[BackupPolicy, str, int]:
    """Every policy query goes through here: a policy, its owner's zone and instance count."""
    stmt = select(BackupPolicy, User.timezone, _instance_count).join(
        User, User.id == BackupPolicy.owner_id
    )
    if not user.is_admin:
        stmt = stmt.where(BackupPolicy.owner_id == user.id)
    return stmt


# Ids come back as text: JSON wants text, and pydantic-core serializes str far faster than
# asyncpg's own UUID type.
_POLICY_COLUMNS = ", ".join(
    f"p.{c.name}::text AS {c.name}" if isinstance(c.type, Uuid) else f"p.{c.name}"
    for c in BackupPolicy.__table__.c
)


def _where(columns: tuple[str, ...], first: int) -> str:
    if not columns:
        return ""
    return "WHERE " + " AND ".join(f"p.{c} = ${first + i}" for i, c in enumerate(columns))


@lru_cache(maxsize=16)
def _page_sql(own: bool, by_owner: bool, by_status: bool) -> tuple[str, str]:
    """The page ($1 limit, $2 offset, then the filters) and the count (the filters only).

    One statement text per combination of filters (not `$n IS NULL OR ...`), so PostgreSQL's
    cached plan for each can use the owner index.
    """
    used = (("owner_id", own), ("owner_id", by_owner), ("status", by_status))
    columns = tuple(column for column, on in used if on)
    count = "SELECT count(*) FROM backup_policies p "
    page = f"""
SELECT {_POLICY_COLUMNS}, u.timezone,
       (SELECT count(*) FROM instances i WHERE i.backup_policy_id = p.id) AS instance_count,
       ({count}{_where(columns, 3)}) AS total
FROM backup_policies p JOIN users u ON u.id = p.owner_id
{_where(columns, 3)}
ORDER BY p.created_at DESC, p.id DESC
LIMIT $1 OFFSET $2"""
    return page, count + _where(columns, 1)


@lru_cache(maxsize=1024)
def _summary(frequency: str, hour: int, day_of_week: str | None) -> str:
    """Cached: a few hundred combinations exist at most."""
    schedule = Schedule(frequency=frequency, hour=hour, day_of_week=day_of_week)  # type: ignore[arg-type]
    return schedule_summary(schedule)


def _read_fields(get: Callable[[str], Any]) -> dict[str, Any]:
    """PolicyRead's fields, from any source of the columns plus timezone and instance_count."""
    frequency, hour, day_of_week = get("frequency"), get("hour"), get("day_of_week")
    return {
        "id": get("id"),
        "owner_id": get("owner_id"),
        "name": get("name"),
        "status": get("status"),
        "schedule": {"frequency": frequency, "hour": hour, "day_of_week": day_of_week},
        "schedule_summary": _summary(frequency, hour, day_of_week),
        "timezone": get("timezone"),
        "max_incremental_chain": get("max_incremental_chain"),
        "retention_count": get("retention_count"),
        "backup_device": get("backup_device"),
        "instance_count": get("instance_count"),
        "last_error": get("last_error"),
        "last_error_at": get("last_error_at"),
        "next_run_at": get("next_run_at"),
        "skipped_runs": get("skipped_runs"),
        "last_skip_reason": get("last_skip_reason"),
        "created_at": get("created_at"),
        "updated_at": get("updated_at"),
    }


async def list_policies_json(
    reads: Reads,
    user: Principal,
    owner_id: uuid.UUID | None,
    status: str | None,
    page: PageParams,
) -> bytes:
    """The list page as JSON: from the read cache, else one prepared statement.

    The busiest screen of the panel, so no ORM objects and no pydantic validation of values
    PostgreSQL has already typed; each item carries exactly PolicyRead's fields (a test holds
    every item equal to the single read). The total rides along as an uncorrelated subquery
    that PostgreSQL computes once; an empty page (offset past the end) asks for it separately.
    A user's pages are retired by their own list's changes, an admin's by everyone's, and both
    by a change to a policy they show (app.cache).
    """
    own = not user.is_admin
    key = (user.id if own else None, owner_id, status, page.limit, page.offset)
    cache = reads.cache
    if (cached := cache.page(key)) is not None:
        return cached
    if (flight := cache.flight(key)) is not None:  # being read: wait for it, then check it
        await flight.wait()
        if (cached := cache.page(key)) is not None:
            return cached
    tag = cache.tag(str(user.id) if own else None)
    with cache.leading(key) if tag is not None else nullcontext():
        return await _read_page(reads, tag, key, user, owner_id, status, page)


async def _read_page(
    reads: Reads,
    tag: Tag | None,
    key: Hashable,
    user: Principal,
    owner_id: uuid.UUID | None,
    status: str | None,
    page: PageParams,
) -> bytes:
    own = not user.is_admin
    page_sql, count_sql = _page_sql(own, owner_id is not None, status is not None)
    filters = [value for value in (user.id if own else None, owner_id, status) if value is not None]
    conn = await reads.connection()
    rows = await conn.fetch(page_sql, page.limit, page.offset, *filters)
    total = rows[0]["total"] if rows else await conn.fetchval(count_sql, *filters)
    body = to_json(
        {
            "items": [_read_fields(row.__getitem__) for row in rows],
            "total": total,
            "limit": page.limit,
            "offset": page.offset,
        }
    )
    if tag is not None:
        reads.cache.keep_page(key, tag, tuple(row["id"] for row in rows), body)
    return body


def to_read(policy: BackupPolicy, zone: str, instance_count: int) -> PolicyRead:
    return PolicyRead(**read_values(policy, zone, instance_count))


def read_values(policy: BackupPolicy, zone: str, instance_count: int) -> dict[str, Any]:
    """A policy's read fields from its ORM object, its owner's zone and its instance count."""
    extra = {"timezone": zone, "instance_count": instance_count}
    return _read_fields(lambda key: extra[key] if key in extra else getattr(policy, key))


async def get_policy_row(
    session: AsyncSession, user: User, policy_id: uuid.UUID
) -> tuple[BackupPolicy, str, int]:
    row = (
        await session.execute(readable_policies(user).where(BackupPolicy.id == policy_id))
    ).first()
    if row is None:
        raise NotFound("Backup policy not found")
    return row[0], row[1], row[2]


async def get_policy(session: AsyncSession, user: User, policy_id: uuid.UUID) -> BackupPolicy:
    return (await get_policy_row(session, user, policy_id))[0]


async def read_policy(session: AsyncSession, user: User, policy_id: uuid.UUID) -> PolicyRead:
    await session.flush()
    return to_read(*await get_policy_row(session, user, policy_id))


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
    policy, zone, _ = await get_policy_row(session, user, policy_id)
    replan = False
    if payload.name is not None:
        policy.name = payload.name
    if payload.schedule is not None:
        policy.frequency = payload.schedule.frequency
        policy.hour = payload.schedule.hour
        policy.day_of_week = payload.schedule.day_of_week
        replan = True
    if payload.max_incremental_chain is not None:
        policy.max_incremental_chain = payload.max_incremental_chain
    if payload.retention_count is not None:
        policy.retention_count = payload.retention_count
    if payload.backup_device is not None:
        policy.backup_device = payload.backup_device
    if payload.status is not None and payload.status != policy.status:
        # Resuming plans from now: a paused policy never fires a burst of missed runs.
        replan = replan or payload.status == PolicyStatus.ACTIVE
        policy.status = payload.status
    if replan:
        plan_next_run(policy, zone)
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
    policies = await session.scalars(select(BackupPolicy).where(BackupPolicy.owner_id == owner.id))
    for policy in policies:
        plan_next_run(policy, owner.timezone)


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
    stmt = select(Instance).where(Instance.id == instance_id)
    if not user.is_admin:
        stmt = stmt.where(Instance.owner_id == user.id)
    instance = await session.scalar(stmt)
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
