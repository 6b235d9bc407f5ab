"""Backup policies: ownership, schedule planning in the owner's zone, attachments."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Select, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import Conflict, Forbidden, NotFound, Unprocessable
from app.models import BackupPolicy, Instance, User
from app.policies.schemas import PolicyCreate, PolicyRead, PolicyUpdate
from app.scheduling import Schedule, next_run_at, schedule_summary
from app.schemas import Page, PageParams, fetch_page

ALREADY_ATTACHED = "Instance is already attached to another backup policy"


def _now() -> datetime:
    return datetime.now(UTC)


def schedule_of(policy: Any) -> Schedule:
    return Schedule(
        frequency=policy.frequency,
        hour=policy.hour,
        day_of_week=policy.day_of_week,
    )


def plan_next_run(policy: BackupPolicy, zone: str, after: datetime | None = None) -> None:
    policy.next_run_at = next_run_at(schedule_of(policy), zone, after or _now())


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


async def list_policies(
    session: AsyncSession,
    user: User,
    owner_id: uuid.UUID | None,
    status: str | None,
    page: PageParams,
) -> Page[PolicyRead]:
    stmt = readable_policies(user)
    if owner_id is not None:
        stmt = stmt.where(BackupPolicy.owner_id == owner_id)
    if status is not None:
        stmt = stmt.where(BackupPolicy.status == status)
    stmt = stmt.order_by(BackupPolicy.created_at.desc(), BackupPolicy.id.desc())
    rows, total = await fetch_page(session, stmt, page)
    items = [to_read(*row) for row in rows]
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)


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
        status="active",
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
        replan = replan or payload.status == "active"
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
