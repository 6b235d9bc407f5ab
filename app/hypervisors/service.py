"""Hypervisors: where instances run, which storage their backups go to, how many at once."""

from __future__ import annotations

import uuid

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import flush_or_conflict
from app.engine.policy_state import refresh_policies_of
from app.errors import Conflict, NotFound, Unprocessable
from app.hypervisors.schemas import HypervisorCreate, HypervisorUpdate
from app.models import BackupStorage, Hypervisor, Instance, Location
from app.models.base import utcnow


def hypervisors_statement() -> Select[Hypervisor]:
    return select(Hypervisor).order_by(Hypervisor.name, Hypervisor.id)


async def get_hypervisor(session: AsyncSession, hypervisor_id: uuid.UUID) -> Hypervisor:
    hypervisor = await session.get(Hypervisor, hypervisor_id)
    if hypervisor is None:
        raise NotFound("Hypervisor not found")
    return hypervisor


async def _check_refs(
    session: AsyncSession, location_id: uuid.UUID | None, storage_id: uuid.UUID | None
) -> None:
    if location_id is not None and await session.get(Location, location_id) is None:
        raise Unprocessable(
            "location_id: no such location",
            errors=[{"field": "location_id", "message": "no such location", "type": "reference"}],
        )
    if storage_id is not None and await session.get(BackupStorage, storage_id) is None:
        raise Unprocessable(
            "backup_storage_id: no such backup storage",
            errors=[
                {
                    "field": "backup_storage_id",
                    "message": "no such backup storage",
                    "type": "reference",
                }
            ],
        )


async def create_hypervisor(session: AsyncSession, payload: HypervisorCreate) -> Hypervisor:
    await _check_refs(session, payload.location_id, payload.backup_storage_id)
    hypervisor = Hypervisor(id=uuid.uuid4(), **payload.model_dump())
    session.add(hypervisor)
    await flush_or_conflict(session, f"A hypervisor named '{payload.name}' already exists")
    return hypervisor


async def update_hypervisor(
    session: AsyncSession, hypervisor: Hypervisor, payload: HypervisorUpdate
) -> Hypervisor:
    changes = payload.model_dump(exclude_unset=True)
    await _check_refs(session, changes.get("location_id"), changes.get("backup_storage_id"))
    storage = hypervisor.backup_storage_id
    for key, value in changes.items():
        if value is None and key != "backup_storage_id":
            continue
        setattr(hypervisor, key, value)
    await flush_or_conflict(session, f"A hypervisor named '{hypervisor.name}' already exists")
    if hypervisor.backup_storage_id != storage:  # its instances' next backups start new chains
        await refresh_policies_of(session, Instance.hypervisor_id == hypervisor.id, utcnow())
    return hypervisor


async def delete_hypervisor(session: AsyncSession, hypervisor: Hypervisor) -> None:
    used = await session.scalar(
        select(Instance.id).where(Instance.hypervisor_id == hypervisor.id).limit(1)
    )
    if used is not None:
        raise Conflict("Hypervisor still has instances; move or delete them first")
    await session.delete(hypervisor)
