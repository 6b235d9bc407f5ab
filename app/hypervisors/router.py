from __future__ import annotations

import uuid

from fastapi import APIRouter, status

from app.auth.deps import AdminUser, TokenFirstRoute
from app.deps import SessionDep
from app.hypervisors import service
from app.hypervisors.schemas import HypervisorCreate, HypervisorRead, HypervisorUpdate
from app.problems import problem_responses
from app.schemas import Page, PageDep, page_of

router = APIRouter(
    route_class=TokenFirstRoute,
    prefix="/hypervisors",
    tags=["hypervisors"],
    responses=problem_responses(401, 403, 404, 422),
)


@router.get("", name="list", summary="List hypervisors (admin)")
async def list_all(session: SessionDep, _: AdminUser, page: PageDep) -> Page[HypervisorRead]:
    return await page_of(
        session, service.hypervisors_statement(), page, HypervisorRead.model_validate
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Register a hypervisor (admin)",
    responses=problem_responses(409),
)
async def create(payload: HypervisorCreate, session: SessionDep, _: AdminUser) -> HypervisorRead:
    return HypervisorRead.model_validate(await service.create_hypervisor(session, payload))


@router.get("/{hypervisor_id}", summary="Read a hypervisor (admin)")
async def read(hypervisor_id: uuid.UUID, session: SessionDep, _: AdminUser) -> HypervisorRead:
    return HypervisorRead.model_validate(await service.get_hypervisor(session, hypervisor_id))


@router.patch(
    "/{hypervisor_id}", summary="Update a hypervisor (admin)", responses=problem_responses(409)
)
async def update(
    hypervisor_id: uuid.UUID, payload: HypervisorUpdate, session: SessionDep, _: AdminUser
) -> HypervisorRead:
    hypervisor = await service.get_hypervisor(session, hypervisor_id)
    return HypervisorRead.model_validate(
        await service.update_hypervisor(session, hypervisor, payload)
    )


@router.delete(
    "/{hypervisor_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a hypervisor (admin)",
    responses=problem_responses(409),
)
async def delete(hypervisor_id: uuid.UUID, session: SessionDep, _: AdminUser) -> None:
    await service.delete_hypervisor(session, await service.get_hypervisor(session, hypervisor_id))
