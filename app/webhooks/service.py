"""Webhook endpoints: users register their own, admins see all and may receive everyone's
events (`all_users`). Others' endpoints are not found."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import get_settings
from app.engine.webhooks.delivery import disable_endpoint
from app.engine.webhooks.events import emit_test_event, seal_secret
from app.engine.webhooks.signing import new_secret
from app.engine.webhooks.urls import UrlRefused, resolve
from app.errors import Conflict, Forbidden, NotFound, Unprocessable
from app.models import User, WebhookDelivery, WebhookEndpoint
from app.schemas import Page, PageParams, page_of
from app.values import DeliveryStatus
from app.webhooks.schemas import (
    DeliveryRead,
    WebhookCreate,
    WebhookCreated,
    WebhookRead,
    WebhookUpdate,
)

DISABLED_BY_REQUEST = "Disabled by a request (PATCH enabled=false)"


def readable_webhooks(user: User, stmt: Select[Any]) -> Select[Any]:
    """Every endpoint query goes through here: admins read all, users their own."""
    return stmt if user.is_admin else stmt.where(WebhookEndpoint.owner_id == user.id)


async def webhooks_page(session: AsyncSession, user: User, params: PageParams) -> Page[WebhookRead]:
    stmt = readable_webhooks(user, select(WebhookEndpoint)).order_by(
        WebhookEndpoint.created_at.desc(), WebhookEndpoint.id
    )
    return await page_of(session, stmt, params, WebhookRead.model_validate)


async def get_webhook(session: AsyncSession, user: User, webhook_id: uuid.UUID) -> WebhookEndpoint:
    endpoint: WebhookEndpoint | None = await session.scalar(
        readable_webhooks(user, select(WebhookEndpoint)).where(WebhookEndpoint.id == webhook_id)
    )
    if endpoint is None:
        raise NotFound("Webhook not found")
    return endpoint


async def _checked_url(url: str) -> str:
    try:
        await resolve(url, get_settings().webhooks_allow_private)
    except UrlRefused as exc:
        raise Unprocessable(
            f"url: {exc}", errors=[{"field": "url", "message": str(exc), "type": "url_refused"}]
        ) from None
    return url


def _only_admins_for_all(user: User, all_users: bool | None) -> None:
    if all_users and not user.is_admin:
        raise Forbidden("Only administrators may receive every user's events (all_users)")


async def create_webhook(
    session: AsyncSession, user: User, payload: WebhookCreate
) -> WebhookCreated:
    _only_admins_for_all(user, payload.all_users)
    secret = new_secret()
    endpoint = WebhookEndpoint(
        id=uuid.uuid4(),
        owner_id=user.id,
        all_users=payload.all_users,
        url=await _checked_url(payload.url),
        description=payload.description,
        events=[str(e) for e in payload.events],
        secret_encrypted=seal_secret(secret),
        enabled=True,
    )
    session.add(endpoint)
    await session.flush()
    await session.refresh(endpoint)
    return WebhookCreated(**WebhookRead.model_validate(endpoint).model_dump(), secret=secret)


async def update_webhook(
    session: AsyncSession, user: User, webhook_id: uuid.UUID, payload: WebhookUpdate
) -> WebhookRead:
    endpoint = await get_webhook(session, user, webhook_id)
    _only_admins_for_all(user, payload.all_users)
    if payload.url is not None:
        endpoint.url = await _checked_url(payload.url)
    if payload.events is not None:
        endpoint.events = [str(e) for e in payload.events]
    if payload.description is not None:
        endpoint.description = payload.description
    if payload.all_users is not None:
        endpoint.all_users = payload.all_users
    if payload.enabled is True and not endpoint.enabled:
        endpoint.enabled, endpoint.disabled_at, endpoint.disabled_reason = True, None, None
    elif payload.enabled is False and endpoint.enabled:
        await disable_endpoint(session, endpoint, DISABLED_BY_REQUEST, datetime.now(UTC))
    await session.flush()
    await session.refresh(endpoint)
    return WebhookRead.model_validate(endpoint)


async def delete_webhook(session: AsyncSession, user: User, webhook_id: uuid.UUID) -> None:
    await session.delete(await get_webhook(session, user, webhook_id))


async def deliveries_page(
    session: AsyncSession,
    user: User,
    webhook_id: uuid.UUID,
    status: DeliveryStatus | None,
    params: PageParams,
) -> Page[DeliveryRead]:
    endpoint = await get_webhook(session, user, webhook_id)
    stmt = (
        select(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint.id)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id)
    )
    if status is not None:
        stmt = stmt.where(WebhookDelivery.status == status)
    return await page_of(session, stmt, params, DeliveryRead.model_validate)


async def send_test_event(session: AsyncSession, user: User, webhook_id: uuid.UUID) -> DeliveryRead:
    """A `webhook.test` delivery to this endpoint; the worker sends it once this commits."""
    endpoint = await get_webhook(session, user, webhook_id)
    if not endpoint.enabled:
        raise Conflict("The webhook is disabled: enable it first (PATCH enabled=true)")
    delivery_id = await emit_test_event(session, endpoint)
    delivery = await session.get(WebhookDelivery, delivery_id)
    assert delivery is not None
    return DeliveryRead.model_validate(delivery)
