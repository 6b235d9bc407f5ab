from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import JSONResponse

from app.auth.deps import AdminUser, CurrentUser, TokenFirstRoute
from app.deps import JobQueueDep, SessionDep
from app.instances import service
from app.instances.schemas import (
    InstanceCreate,
    InstanceDeletion,
    InstanceRead,
    InstanceUpdate,
)
from app.problems import problem_responses
from app.schemas import Page, PageDep, page_of
from app.values import InstanceStatus, Protection

router = APIRouter(
    route_class=TokenFirstRoute,
    prefix="/instances",
    tags=["instances"],
    responses=problem_responses(401, 404, 422),
)


@router.get("", name="list", summary="List instances (yours; admins see all)")
async def list_all(
    session: SessionDep,
    user: CurrentUser,
    page: PageDep,
    owner_id: Annotated[uuid.UUID | None, Query(description="Only this owner's (admins).")] = None,
    status: Annotated[InstanceStatus | None, Query()] = None,
    protection: Annotated[
        Protection | None,
        Query(description="Only instances in this state against their policy's interval."),
    ] = None,
) -> Page[InstanceRead]:
    stmt = service.list_statement(user, owner_id, status, protection)
    return await page_of(session, stmt, page, InstanceRead.model_validate)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Register an instance (admin)",
    responses=problem_responses(403, 409),
)
async def create(payload: InstanceCreate, session: SessionDep, _: AdminUser) -> InstanceRead:
    instance = await service.create_instance(session, payload)
    return InstanceRead.model_validate(instance)


@router.get("/{instance_id}", summary="Read an instance")
async def read(instance_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> InstanceRead:
    return InstanceRead.model_validate(await service.get_instance(session, user, instance_id))


@router.patch(
    "/{instance_id}", summary="Update an instance (admin)", responses=problem_responses(403, 409)
)
async def update(
    instance_id: uuid.UUID, payload: InstanceUpdate, session: SessionDep, admin: AdminUser
) -> InstanceRead:
    instance = await service.get_instance(session, admin, instance_id, for_update=True)
    return InstanceRead.model_validate(await service.update_instance(session, instance, payload))


@router.delete(
    "/{instance_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an instance (admin); with delete_backups=true, its backups too",
    response_class=Response,
    responses={
        **problem_responses(403, 409),
        202: {
            "model": InstanceDeletion,
            "description": "Its backups are being deleted; the instance is gone from the API "
            "now, and from the catalog once their files are removed.",
        },
    },
)
async def delete(
    instance_id: uuid.UUID,
    session: SessionDep,
    admin: AdminUser,
    jobs: JobQueueDep,
    delete_backups: Annotated[
        bool,
        Query(description="Also delete its backups (409 without it when it has some)."),
    ] = False,
) -> Response:
    instance = await service.get_instance(session, admin, instance_id, for_update=True)
    deleting = await service.delete_instance(session, instance, delete_backups, jobs)
    if deleting is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    body = InstanceDeletion(backup_ids=deleting)
    return JSONResponse(body.model_dump(mode="json"), status_code=status.HTTP_202_ACCEPTED)
