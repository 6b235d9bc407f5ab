"""Cost estimates: what a policy's backups store at steady state and what that costs a month,
for a policy being drafted (with the instances to attach) or as it stands (its detail)."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import NotFound
from app.instances.service import readable_instances
from app.models import Backup, BackupPolicy, Hypervisor, Instance, InstanceDisk, Location, User
from app.policies.schemas import (
    EstimateRequest,
    InstanceEstimate,
    LocationEstimate,
    PolicyDetail,
    PolicyEstimate,
)
from app.policies.service import attached_instances, read_policy_and_row
from app.scheduling import Schedule
from app.scheduling.footprint import (
    ASSUMED_DAILY_CHANGE_PERCENT,
    MEASURED_INCREMENTALS,
    incrementals_per_chain,
    instance_footprint,
)
from app.schemas import monthly_cost, monthly_text
from app.values import BackupDevice, BackupStatus, BackupType


@dataclass(frozen=True)
class Settings:
    """The parts of a policy an estimate depends on."""

    schedule: Schedule
    max_incremental_chain: int
    retention_count: int
    backup_device: BackupDevice


async def estimate(session: AsyncSession, user: User, payload: EstimateRequest) -> PolicyEstimate:
    """The estimate of a policy not saved yet; instances the caller cannot read are 404."""
    ids = set(payload.instance_ids)
    found = set(
        await session.scalars(
            readable_instances(user).with_only_columns(Instance.id).where(Instance.id.in_(ids))
        )
    )
    if found != ids:
        raise NotFound("Instance not found")
    schedule = payload.schedule
    settings = Settings(
        Schedule(schedule.frequency, schedule.hour, schedule.day_of_week),
        payload.max_incremental_chain,
        payload.retention_count,
        payload.backup_device,
    )
    return await estimate_for(session, settings, payload.instance_ids)


async def policy_detail(session: AsyncSession, user: User, policy_id: uuid.UUID) -> PolicyDetail:
    """The policy, the estimate of its attached instances and what they store under it today."""
    policy, read = await read_policy_and_row(session, user, policy_id)
    ids = list(await session.scalars(attached_instances(policy).with_only_columns(Instance.id)))
    settings = Settings(
        policy.schedule,
        policy.max_incremental_chain,
        policy.retention_count,
        BackupDevice(policy.backup_device),
    )
    return PolicyDetail(
        **read.model_dump(),
        estimate=await estimate_for(session, settings, ids),
        stored_bytes=await stored_today(session, policy),
    )


async def stored_today(session: AsyncSession, policy: BackupPolicy) -> int:
    """Bytes of the completed backups that the policy's attached instances have under it."""
    total = await session.scalar(
        select(func.coalesce(func.sum(Backup.size_bytes), 0))
        .join(Instance, Instance.id == Backup.instance_id)
        .where(
            Backup.policy_id == policy.id,
            Instance.backup_policy_id == policy.id,
            Backup.status == BackupStatus.COMPLETED,
        )
    )
    return int(total or 0)


async def estimate_for(
    session: AsyncSession, settings: Settings, instance_ids: Sequence[uuid.UUID]
) -> PolicyEstimate:
    device, chains = settings.backup_device, settings.retention_count
    per_chain = incrementals_per_chain(settings.schedule, settings.max_incremental_chain)
    allocated = await _allocated_bytes(session, instance_ids, device)
    fulls = await _latest_fulls(session, instance_ids, device)
    incrementals = await _recent_incrementals(session, instance_ids, device)
    rows = await session.execute(
        select(
            Instance.id,
            Instance.name,
            Location.id,
            Location.name,
            Location.backup_price_per_gb_month,
        )
        .join(Hypervisor, Hypervisor.id == Instance.hypervisor_id)
        .join(Location, Location.id == Hypervisor.location_id)
        .where(Instance.id.in_(instance_ids))
        .order_by(Instance.name, Instance.id)
    )
    instances: list[InstanceEstimate] = []
    locations: dict[uuid.UUID, LocationEstimate] = {}
    for instance_id, name, location_id, location_name, price in rows:
        measured = incrementals.get(instance_id, [])
        footprint = instance_footprint(
            allocated.get(instance_id, 0), fulls.get(instance_id), measured, chains, per_chain
        )
        instances.append(
            InstanceEstimate(
                instance_id=instance_id,
                name=name,
                location_id=location_id,
                full_bytes=footprint.full_bytes,
                full_basis=footprint.full_basis,
                incremental_bytes=footprint.incremental_bytes,
                incremental_basis=footprint.incremental_basis,
                measured_incrementals=len(measured),
                stored_bytes=footprint.stored_bytes,
            )
        )
        location = locations.setdefault(
            location_id,
            LocationEstimate(
                location_id=location_id,
                name=location_name,
                price_per_gb_month=price,
                stored_bytes=0,
                monthly_cost=None,
            ),
        )
        location.stored_bytes += footprint.stored_bytes
    costs = {
        loc_id: monthly_cost(loc.stored_bytes, loc.price_per_gb_month)
        for loc_id, loc in locations.items()
        if loc.price_per_gb_month is not None
    }
    for loc_id, cost in costs.items():
        locations[loc_id].monthly_cost = monthly_text(cost)
    ordered = sorted(locations.values(), key=lambda loc: (loc.name, loc.location_id))
    unpriced = [loc.name for loc in ordered if loc.price_per_gb_month is None]
    total = None if unpriced else monthly_text(sum(costs.values(), Decimal(0)))
    return PolicyEstimate(
        stored_bytes=sum(i.stored_bytes for i in instances),
        monthly_cost=total,
        chains=chains,
        incrementals_per_chain=per_chain,
        instances=instances,
        locations=ordered,
        assumptions=_assumptions(settings, per_chain, unpriced),
    )


def _assumptions(settings: Settings, per_chain: int, unpriced: list[str]) -> list[str]:
    disks = "the boot disk" if settings.backup_device == BackupDevice.PRIMARY else "every disk"
    said = [
        f"Steady state: {settings.retention_count} chain(s) per instance (retention_count), "
        f"each one full and {per_chain} incremental(s) (the chain length this schedule "
        "reaches). Retention counts the chain being grown among the kept ones, so this is the "
        "most stored: the day before a new full starts a chain.",
        "Not counted: while a new full is written, and until retention has deleted the oldest "
        "chain after it, one more full is stored for a short time.",
        f"A full: the instance's latest completed full of {disks}; without one, the "
        f"allocated size of {disks} (a first full is often smaller: only written blocks are "
        "stored).",
        f"An incremental (one run's changes): the median of the instance's last "
        f"{MEASURED_INCREMENTALS} completed incrementals of {disks}; without any, "
        f"{ASSUMED_DAILY_CHANGE_PERCENT}% of the allocated size of {disks}.",
        "Monthly cost: stored bytes / 2^30 x the backup price per GB-month of the location of "
        "the instance's hypervisor, per location, then summed (as a backup's monthly_cost).",
    ]
    if unpriced:
        said.append(
            "No backup price in location(s) " + ", ".join(unpriced) + ": their cost is null, "
            "and so is the total monthly_cost; the priced locations' costs are given."
        )
    return said


async def _allocated_bytes(
    session: AsyncSession, instance_ids: Sequence[uuid.UUID], device: BackupDevice
) -> dict[uuid.UUID, int]:
    allocated: dict[uuid.UUID, int] = defaultdict(int)
    rows = await session.execute(
        select(InstanceDisk.instance_id, InstanceDisk.boot, InstanceDisk.size_bytes).where(
            InstanceDisk.instance_id.in_(instance_ids)
        )
    )
    for instance_id, boot, size in rows:
        if device.covers(boot):
            allocated[instance_id] += size
    return allocated


def _conditions(
    instance_ids: Sequence[uuid.UUID], device: BackupDevice, kind: BackupType
) -> tuple[ColumnElement[bool], ...]:
    """The instance's completed backups of `kind` of these disks: what was measured."""
    return (
        Backup.instance_id.in_(instance_ids),
        Backup.backup_device == device,
        Backup.type == kind,
        Backup.status == BackupStatus.COMPLETED,
        Backup.size_bytes.is_not(None),
    )


async def _latest_fulls(
    session: AsyncSession, instance_ids: Sequence[uuid.UUID], device: BackupDevice
) -> dict[uuid.UUID, int]:
    rows = await session.execute(
        select(Backup.instance_id, Backup.size_bytes)
        .where(*_conditions(instance_ids, device, BackupType.FULL))
        .order_by(Backup.instance_id, Backup.created_at.desc(), Backup.id.desc())
        .ext(distinct_on(Backup.instance_id))
    )
    return {instance_id: size for instance_id, size in rows if size is not None}


async def _recent_incrementals(
    session: AsyncSession, instance_ids: Sequence[uuid.UUID], device: BackupDevice
) -> dict[uuid.UUID, list[int]]:
    newest = (
        func.row_number()
        .over(
            partition_by=Backup.instance_id,
            order_by=(Backup.created_at.desc(), Backup.id.desc()),
        )
        .label("newest")
    )
    recent = (
        select(Backup.instance_id, Backup.size_bytes, newest)
        .where(*_conditions(instance_ids, device, BackupType.INCREMENTAL))
        .subquery()
    )
    rows = await session.execute(
        select(recent.c.instance_id, recent.c.size_bytes).where(
            recent.c.newest <= MEASURED_INCREMENTALS
        )
    )
    sizes: dict[uuid.UUID, list[int]] = defaultdict(list)
    for instance_id, size in rows:
        sizes[instance_id].append(size)
    return sizes
