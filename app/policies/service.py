"""Backup policies: ownership, schedule planning in the owner's zone, attachments."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import ColumnElement, Select, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import Conflict, Forbidden, NotFound, Unprocessable
from app.models import BackupPolicy, Instance, User
from app.policies.schemas import PolicyCreate, PolicyRead, PolicyUpdate
from app.scheduling import Schedule, next_run_at, schedule_summary
from app.schemas import Page, PageParams

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


def _filters(
    user: User, owner_id: uuid.UUID | None, status: str | None
) -> list[ColumnElement[bool]]:
    conditions = [] if user.is_admin else [BackupPolicy.owner_id == user.id]
    if owner_id is not None:
        conditions.append(BackupPolicy.owner_id == owner_id)
    if status is not None:
        conditions.append(BackupPolicy.status == status)
    return conditions


_POLICY_PAGE = TypeAdapter(Page[PolicyRead])


async def list_policies_json(
    session: AsyncSession,
    user: User,
    owner_id: uuid.UUID | None,
    status: str | None,
    page: PageParams,
) -> bytes:
    """The list page as JSON, built from plain rows and serialized once in pydantic-core.

    The busiest screen of the panel: no ORM objects, no second validation of the response.
    """
    conditions = _filters(user, owner_id, status)
    count = select(func.count()).select_from(BackupPolicy).where(*conditions)
    # The total rides along as an uncorrelated subquery: PostgreSQL computes it once, and the
    # page costs one round trip. An empty page (offset past the end) asks for it separately.
    rows = (
        await session.execute(
            select(
                *BackupPolicy.__table__.c,
                User.timezone,
                _instance_count.label("n"),
                count.scalar_subquery().label("total"),
            )
            .join(User, User.id == BackupPolicy.owner_id)
            .where(*conditions)
            .order_by(BackupPolicy.created_at.desc(), BackupPolicy.id.desc())
            .limit(page.limit)
            .offset(page.offset)
        )
    ).all()
    total = rows[0].total if rows else await session.scalar(count)
    items = [read_values(row, row.timezone, row.n) for row in rows]
    body = {"items": items, "total": total or 0, "limit": page.limit, "offset": page.offset}
    return _POLICY_PAGE.dump_json(_POLICY_PAGE.validate_python(body))


def to_read(policy: BackupPolicy, zone: str, instance_count: int) -> PolicyRead:
    return PolicyRead(**read_values(policy, zone, instance_count))


def read_values(policy: Any, zone: str, instance_count: int) -> dict[str, Any]:
    """A policy's read fields from an ORM object or a plain row with the same columns."""
    schedule = schedule_of(policy)
    return dict(
        id=policy.id,
        owner_id=policy.owner_id,
        name=policy.name,
        status=policy.status,
        schedule={
            "frequency": schedule.frequency,
            "hour": schedule.hour,
            "day_of_week": schedule.day_of_week,
        },
        schedule_summary=schedule_summary(schedule),
        timezone=zone,
        max_incremental_chain=policy.max_incremental_chain,
        retention_count=policy.retention_count,
        backup_device=policy.backup_device,
        instance_count=instance_count,
        last_error=policy.last_error,
        last_error_at=policy.last_error_at,
        next_run_at=policy.next_run_at,
        skipped_runs=policy.skipped_runs,
        last_skip_reason=policy.last_skip_reason,
        created_at=policy.created_at,
        updated_at=policy.updated_at,
    )


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
