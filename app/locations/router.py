from __future__ import annotations

import uuid

from fastapi import APIRouter, status

from app.auth.deps import AdminUser, TokenFirstRoute
from app.deps import SessionDep
from app.locations import service
from app.locations.schemas import LocationCreate, LocationRead, LocationUpdate
from app.problems import problem_responses
from app.schemas import Page, PageDep, page_of

router = APIRouter(
    route_class=TokenFirstRoute,
    prefix="/locations",
    tags=["locations"],
    responses=problem_responses(401, 403, 404, 422),
)


@router.get("", name="list", summary="List locations (admin)")
async def list_all(session: SessionDep, _: AdminUser, page: PageDep) -> Page[LocationRead]:
    return await page_of(session, service.locations_statement(), page, LocationRead.model_validate)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create a location (admin)",
    responses=problem_responses(409),
)
async def create(payload: LocationCreate, session: SessionDep, _: AdminUser) -> LocationRead:
    return LocationRead.model_validate(await service.create_location(session, payload))


@router.get("/{location_id}", summary="Read a location (admin)")
async def read(location_id: uuid.UUID, session: SessionDep, _: AdminUser) -> LocationRead:
    return LocationRead.model_validate(await service.get_location(session, location_id))


@router.patch(
    "/{location_id}", summary="Update a location (admin)", responses=problem_responses(409)
)
async def update(
    location_id: uuid.UUID, payload: LocationUpdate, session: SessionDep, _: AdminUser
) -> LocationRead:
    location = await service.get_location(session, location_id)
    return LocationRead.model_validate(await service.update_location(session, location, payload))


@router.delete(
    "/{location_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a location (admin)",
    responses=problem_responses(409),
)
async def delete(location_id: uuid.UUID, session: SessionDep, _: AdminUser) -> None:
    await service.delete_location(session, await service.get_location(session, location_id))
