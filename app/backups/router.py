from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status

from app.auth.deps import CurrentUser, TokenFirstRoute
from app.backups import manual, service
from app.backups.schemas import (
    BackupDeletion,
    BackupNowRequest,
    BackupRead,
    StatusFilter,
    TypeFilter,
)
from app.deps import JobQueueDep, SessionDep
from app.instances.service import get_instance
from app.problems import problem_responses
from app.schemas import Page, PageDep, fetch_page
from app.values import BackupType

router = APIRouter(
    route_class=TokenFirstRoute, tags=["backups"], responses=problem_responses(401, 404, 422)
)


@router.get("/instances/{instance_id}/backups", summary="List an instance's backups")
async def list_for_instance(
    instance_id: uuid.UUID,
    session: SessionDep,
    user: CurrentUser,
    page: PageDep,
    status_: StatusFilter = None,
    type_: TypeFilter = None,
) -> Page[BackupRead]:
    instance = await get_instance(session, user, instance_id)
    stmt = service.list_statement(user, instance_id=instance.id, status=status_, type_=type_)
    rows, total = await fetch_page(session, stmt, page)
    items = await service.to_reads(session, user, rows)
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)


@router.get("/backups/{backup_id}", summary="Read a backup")
async def read(backup_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> BackupRead:
    return await service.read_backup(session, user, backup_id)


@router.delete(
    "/backups/{backup_id}",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Delete a backup (and, with cascade, the backups that depend on it)",
    responses=problem_responses(409),
)
async def delete(
    backup_id: uuid.UUID,
    session: SessionDep,
    user: CurrentUser,
    jobs: JobQueueDep,
    cascade: Annotated[
        bool, Query(description="Also delete later backups of the chain that need this one.")
    ] = False,
) -> BackupDeletion:
    return await service.delete_backup(session, user, backup_id, cascade, jobs)


@router.post(
    "/instances/{instance_id}/backups",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Back up now (a manual backup that follows the chain rules)",
    responses=problem_responses(409),
)
async def backup_now(
    instance_id: uuid.UUID,
    session: SessionDep,
    user: CurrentUser,
    jobs: JobQueueDep,
    payload: BackupNowRequest | None = None,
) -> BackupRead:
    force_full = payload is not None and payload.type == BackupType.FULL
    return await manual.backup_now(session, user, instance_id, force_full, jobs)


@router.post(
    "/backups/{backup_id}/verify",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Verify a backup: fetch its chain, check every hash, rebuild and check the images",
    responses=problem_responses(409),
)
async def verify(
    backup_id: uuid.UUID, session: SessionDep, user: CurrentUser, jobs: JobQueueDep
) -> BackupRead:
    return await service.request_verify(session, user, backup_id, jobs)
