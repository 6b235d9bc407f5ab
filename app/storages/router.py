from __future__ import annotations

import uuid

from fastapi import APIRouter, status

from app.auth.deps import AdminUser, TokenFirstRoute
from app.deps import JobQueueDep, SessionDep
from app.problems import problem_responses
from app.schemas import Page, PageDep
from app.storages import service
from app.storages.schemas import BackupStorageCreate, BackupStorageRead, BackupStorageUpdate

router = APIRouter(
    route_class=TokenFirstRoute,
    prefix="/backup-storages",
    tags=["backup-storages"],
    responses=problem_responses(401, 403, 404, 422),
)


# 409 on reads: a storage's secrets do not open with the current IBP_SECRET_KEY.
@router.get(
    "", name="list", summary="List backup storages (admin)", responses=problem_responses(409)
)
async def list_all(session: SessionDep, _: AdminUser, page: PageDep) -> Page[BackupStorageRead]:
    return await service.storages_page(session, page)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create a backup storage (admin)",
    responses=problem_responses(409),
)
async def create(
    payload: BackupStorageCreate, session: SessionDep, _: AdminUser
) -> BackupStorageRead:
    return service.to_read(await service.create_storage(session, payload))


@router.get(
    "/{storage_id}", summary="Read a backup storage (admin)", responses=problem_responses(409)
)
async def read(storage_id: uuid.UUID, session: SessionDep, _: AdminUser) -> BackupStorageRead:
    return service.to_read(await service.get_storage(session, storage_id))


@router.patch(
    "/{storage_id}", summary="Update a backup storage (admin)", responses=problem_responses(409)
)
async def update(
    storage_id: uuid.UUID, payload: BackupStorageUpdate, session: SessionDep, _: AdminUser
) -> BackupStorageRead:
    storage = await service.get_storage(session, storage_id)
    return service.to_read(await service.update_storage(session, storage, payload))


@router.delete(
    "/{storage_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a backup storage (admin)",
    responses=problem_responses(409),
)
async def delete(storage_id: uuid.UUID, session: SessionDep, _: AdminUser) -> None:
    await service.delete_storage(session, await service.get_storage(session, storage_id))


@router.post(
    "/{storage_id}/check",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Check a backup storage on a hypervisor using it: write, read back and delete a "
    "probe (admin). Answers at once with status 'checking'; poll the storage for the result.",
    responses=problem_responses(409),
)
async def check(
    storage_id: uuid.UUID, session: SessionDep, _: AdminUser, jobs: JobQueueDep
) -> BackupStorageRead:
    storage = await service.get_storage(session, storage_id)
    return service.to_read(await service.request_check(session, storage, jobs))
