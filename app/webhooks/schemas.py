"""Webhook endpoints and their deliveries as the API shows them; the secret only once."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from app.schemas import RequestBody, Schema, UserName
from app.values import DeliveryStatus, WebhookEvent


def _distinct(events: list[WebhookEvent]) -> list[WebhookEvent]:
    return list(dict.fromkeys(events))


Events = Annotated[
    list[WebhookEvent],
    Field(min_length=1, max_length=len(WebhookEvent), description="The events to receive."),
    AfterValidator(_distinct),
]
Url = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2000,
        description="http:// or https://; its host must resolve to public addresses unless "
        "the server allows private ones (IBP_WEBHOOKS_ALLOW_PRIVATE). Redirects are not "
        "followed.",
    ),
]


class WebhookCreate(RequestBody):
    url: Url
    events: Events
    description: UserName = ""
    all_users: bool = Field(
        default=False,
        description="Admins only: receive the events of every user's objects, not only your own.",
    )


class WebhookUpdate(RequestBody):
    url: Url | None = None
    events: Events | None = None
    description: UserName | None = None
    all_users: bool | None = Field(default=None, description="Admins only.")
    enabled: bool | None = Field(
        default=None,
        description="false stops deliveries (pending ones fail); true enables the endpoint "
        "again, also after it was disabled for failing.",
    )


class WebhookRead(Schema):
    id: uuid.UUID
    owner_id: uuid.UUID
    url: str
    description: str
    events: list[WebhookEvent]
    all_users: bool
    enabled: bool
    disabled_at: datetime | None
    disabled_reason: str | None = Field(
        description="Why the endpoint is disabled: by a request, or after every attempt of a "
        "delivery failed for about a day."
    )
    created_at: datetime
    updated_at: datetime


class WebhookCreated(WebhookRead):
    secret: str = Field(
        description="The signing secret (`whsec_...`), shown this once: verify each delivery's "
        "`webhook-signature` with it (Standard Webhooks)."
    )


class DeliveryRead(Schema):
    id: uuid.UUID
    event_type: str
    message_id: str = Field(description="The `webhook-id` header: the same on every attempt.")
    payload: dict[str, Any]
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_response_code: int | None
    last_error: str | None
    created_at: datetime
    completed_at: datetime | None
