"""Locations: where hypervisors stand, and the optional backup price there."""

from __future__ import annotations

import uuid

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import flush_or_conflict
from app.errors import Conflict, NotFound
from app.locations.schemas import LocationCreate, LocationUpdate
from app.models import Hypervisor, Location


def locations_statement() -> Select[Location]:
    return select(Location).order_by(Location.name, Location.id)


async def get_location(session: AsyncSession, location_id: uuid.UUID) -> Location:
    location = await session.get(Location, location_id)
    if location is None:
        raise NotFound("Location not found")
    return location


async def create_location(session: AsyncSession, payload: LocationCreate) -> Location:
    location = Location(id=uuid.uuid4(), **payload.model_dump())
    session.add(location)
    await flush_or_conflict(session, f"A location named '{payload.name}' already exists")
    return location


async def update_location(
    session: AsyncSession, location: Location, payload: LocationUpdate
) -> Location:
    for key, value in payload.model_dump(exclude_unset=True).items():
        if key == "name" and value is None:
            continue
        setattr(location, key, value)
    await flush_or_conflict(session, f"A location named '{location.name}' already exists")
    return location


async def delete_location(session: AsyncSession, location: Location) -> None:
    used = await session.scalar(select(Hypervisor.id).where(Hypervisor.location_id == location.id))
    if used is not None:
        raise Conflict("Location still has hypervisors; move or delete them first")
    await session.delete(location)
