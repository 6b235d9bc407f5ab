from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from app.auth.deps import CurrentUser, TokenFirstRoute
from app.backups import service as backups
from app.backups.schemas import BackupRead, StatusFilter, TypeFilter
from app.deps import SessionDep
from app.instances.schemas import InstanceBrief
from app.policies import estimate, preview, service
from app.policies.schemas import (
    AttachRequest,
    EstimateRequest,
    PolicyCreate,
    PolicyDetail,
    PolicyEstimate,
    PolicyRead,
    PolicyUpdate,
    SchedulePreviewRun,
)
from app.problems import problem_responses
from app.schemas import Page, PageDep, fetch_page, page_of
from app.values import PolicyStatus

router = APIRouter(
    route_class=TokenFirstRoute,
    prefix="/backup-policies",
    tags=["backup-policies"],
    responses=problem_responses(401, 404, 422),
)


@router.get(
    "",
    name="list",
    summary="List backup policies (yours; admins see all)",
    response_model=Page[PolicyRead],
)
async def list_all(
    session: SessionDep,
    user: CurrentUser,
    page: PageDep,
    owner_id: Annotated[uuid.UUID | None, Query(description="Only this owner's (admins).")] = None,
    status: Annotated[PolicyStatus | None, Query()] = None,
) -> Response:
    body = await service.list_policies_json(session, user, owner_id, status, page)
    return Response(body, media_type="application/json")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create a backup policy",
    responses=problem_responses(403),
)
async def create(payload: PolicyCreate, session: SessionDep, user: CurrentUser) -> PolicyRead:
    return await service.create_policy(session, user, payload)


@router.post(
    "/estimate",
    name="estimate",
    summary="Estimate what a policy would store at steady state and cost a month",
    description="Nothing is saved. Your instances only (admins: any); the response states the "
    "assumptions behind the figures.",
)
async def estimate_cost(
    payload: EstimateRequest, session: SessionDep, user: CurrentUser
) -> PolicyEstimate:
    return await estimate.estimate(session, user, payload)


@router.get(
    "/{policy_id}",
    summary="Read a backup policy, with its estimate and what it stores today",
)
async def read(policy_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> PolicyDetail:
    return await estimate.policy_detail(session, user, policy_id)


@router.patch("/{policy_id}", summary="Edit, pause or resume a backup policy")
async def update(
    policy_id: uuid.UUID, payload: PolicyUpdate, session: SessionDep, user: CurrentUser
) -> PolicyRead:
    return await service.update_policy(session, user, policy_id, payload)


@router.delete(
    "/{policy_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a backup policy (its instances are detached, its backups kept)",
)
async def delete(policy_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> None:
    await service.delete_policy(session, user, policy_id)


@router.get(
    "/{policy_id}/schedule-preview",
    summary="The next runs (UTC and local) and whether each is a full or an incremental",
)
async def schedule_preview(
    policy_id: uuid.UUID,
    session: SessionDep,
    user: CurrentUser,
    count: Annotated[int, Query(ge=1, le=100)] = 10,
    instance_id: Annotated[
        uuid.UUID | None,
        Query(description="Plan from this attached instance's real chain (default: a new one)."),
    ] = None,
) -> list[SchedulePreviewRun]:
    return await preview.schedule_preview(session, user, policy_id, count, instance_id)


@router.get("/{policy_id}/instances", summary="Instances attached to the policy")
async def list_instances(
    policy_id: uuid.UUID, session: SessionDep, user: CurrentUser, page: PageDep
) -> Page[InstanceBrief]:
    policy = await service.get_policy(session, user, policy_id)
    return await page_of(
        session, service.attached_instances(policy), page, InstanceBrief.model_validate
    )


@router.get(
    "/{policy_id}/attachable-instances",
    summary="The owner's instances attached to no policy (the Attach dropdown)",
)
async def list_attachable_instances(
    policy_id: uuid.UUID, session: SessionDep, user: CurrentUser, page: PageDep
) -> Page[InstanceBrief]:
    policy = await service.get_policy(session, user, policy_id)
    return await page_of(
        session, service.attachable_instances(policy), page, InstanceBrief.model_validate
    )


@router.post(
    "/{policy_id}/instances",
    status_code=status.HTTP_201_CREATED,
    summary="Attach an instance (201; 200 when it already was attached here)",
    responses={
        200: {"model": InstanceBrief, "description": "Already attached to this policy"},
        **problem_responses(409),
    },
)
async def attach_instance(
    policy_id: uuid.UUID,
    payload: AttachRequest,
    session: SessionDep,
    user: CurrentUser,
    response: Response,
) -> InstanceBrief:
    instance, created = await service.attach_instance(session, user, policy_id, payload.instance_id)
    if not created:
        response.status_code = status.HTTP_200_OK
    return InstanceBrief.model_validate(instance)


@router.delete(
    "/{policy_id}/instances/{instance_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Detach an instance (its backups are kept)",
)
async def detach_instance(
    policy_id: uuid.UUID, instance_id: uuid.UUID, session: SessionDep, user: CurrentUser
) -> None:
    await service.detach_instance(session, user, policy_id, instance_id)


@router.get("/{policy_id}/backups", summary="Backups this policy produced")
async def list_backups(
    policy_id: uuid.UUID,
    session: SessionDep,
    user: CurrentUser,
    page: PageDep,
    status_: StatusFilter = None,
    type_: TypeFilter = None,
) -> Page[BackupRead]:
    policy = await service.get_policy(session, user, policy_id)
    stmt = backups.list_statement(user, policy_id=policy.id, status=status_, type_=type_)
    rows, total = await fetch_page(session, stmt, page)
    items = await backups.to_reads(session, user, rows)
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)
