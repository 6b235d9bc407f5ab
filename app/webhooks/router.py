from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status

from app.auth.deps import CurrentUser, TokenFirstRoute
from app.deps import SessionDep
from app.problems import problem_responses
from app.schemas import Page, PageDep
from app.values import DeliveryStatus
from app.webhooks import service
from app.webhooks.schemas import (
    DeliveryRead,
    WebhookCreate,
    WebhookCreated,
    WebhookRead,
    WebhookUpdate,
)

router = APIRouter(
    route_class=TokenFirstRoute,
    prefix="/webhooks",
    tags=["webhooks"],
    responses=problem_responses(401, 404, 422),
)


@router.get("", name="list", summary="List webhook endpoints (yours; admins see all)")
async def list_all(session: SessionDep, user: CurrentUser, page: PageDep) -> Page[WebhookRead]:
    return await service.webhooks_page(session, user, page)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Register a webhook endpoint; the answer holds its signing secret, shown once",
    responses=problem_responses(403),
)
async def create(payload: WebhookCreate, session: SessionDep, user: CurrentUser) -> WebhookCreated:
    return await service.create_webhook(session, user, payload)


@router.get("/{webhook_id}", summary="Read a webhook endpoint (never its secret)")
async def read(webhook_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> WebhookRead:
    return WebhookRead.model_validate(await service.get_webhook(session, user, webhook_id))


@router.patch(
    "/{webhook_id}",
    summary="Change, disable or enable again a webhook endpoint",
    responses=problem_responses(403),
)
async def update(
    webhook_id: uuid.UUID, payload: WebhookUpdate, session: SessionDep, user: CurrentUser
) -> WebhookRead:
    return await service.update_webhook(session, user, webhook_id, payload)


@router.delete(
    "/{webhook_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a webhook endpoint and its delivery log",
)
async def delete(webhook_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> None:
    await service.delete_webhook(session, user, webhook_id)


@router.get("/{webhook_id}/deliveries", summary="The endpoint's delivery log, newest first")
async def deliveries(
    webhook_id: uuid.UUID,
    session: SessionDep,
    user: CurrentUser,
    page: PageDep,
    status: Annotated[DeliveryStatus | None, Query()] = None,
) -> Page[DeliveryRead]:
    return await service.deliveries_page(session, user, webhook_id, status, page)


@router.post(
    "/{webhook_id}/test",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Send a `webhook.test` event to this endpoint now (the worker delivers it, signed, "
    "with the usual retries); poll the delivery log for the outcome",
    responses=problem_responses(409),
)
async def send_test(webhook_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> DeliveryRead:
    return await service.send_test_event(session, user, webhook_id)
