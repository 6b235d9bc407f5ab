from __future__ import annotations

import uuid

from fastapi import APIRouter, status

from app.auth.deps import CurrentUser, TokenFirstRoute
from app.deps import JobQueueDep, SessionDep
from app.instances.service import get_instance
from app.problems import problem_responses
from app.restores import service
from app.restores.schemas import RestoreCreate, RestoreRead
from app.schemas import Page, PageDep, page_of

router = APIRouter(
    route_class=TokenFirstRoute, tags=["restores"], responses=problem_responses(401, 404, 422)
)


@router.post(
    "/backups/{backup_id}/restore",
    status_code=status.HTTP_202_ACCEPTED,
    name="create",
    summary="Restore a backup onto its instance (in place) or next to its disks (new disk)",
    responses=problem_responses(409),
)
async def create(
    backup_id: uuid.UUID,
    payload: RestoreCreate,
    session: SessionDep,
    user: CurrentUser,
    jobs: JobQueueDep,
) -> RestoreRead:
    restore = await service.start_restore(session, user, backup_id, payload.target, jobs)
    return service.to_read(restore, user)


@router.get("/restores/{restore_id}", name="read", summary="Read a restore")
async def read(restore_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> RestoreRead:
    return service.to_read(await service.get_restore(session, user, restore_id), user)


@router.get(
    "/instances/{instance_id}/restores",
    name="list_for_instance",
    summary="List an instance's restores",
)
async def list_for_instance(
    instance_id: uuid.UUID, session: SessionDep, user: CurrentUser, page: PageDep
) -> Page[RestoreRead]:
    instance = await get_instance(session, user, instance_id)
    return await page_of(
        session, service.list_statement(user, instance.id), page, lambda r: service.to_read(r, user)
    )
