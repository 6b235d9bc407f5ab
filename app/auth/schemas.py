from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from app.schemas import Name, RequestBody, Schema
from app.security import FRESH_LOGIN_MINUTES


class LoginRequest(RequestBody):
    email: str = Field(min_length=3, max_length=320)
    password: str = Field(min_length=1, max_length=1024)


class AccessToken(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_at: datetime


class ApiTokenCreate(RequestBody):
    name: Name
    expires_at: datetime | None = Field(
        default=None,
        description="When the token stops working (UTC). Omit both this and expires_in_days "
        "for no expiry (refused when the administrator set a maximum, IBP_MAX_TOKEN_DAYS).",
    )
    expires_in_days: int | None = Field(
        default=None,
        ge=1,
        le=36500,
        description="Or: the token stops working after this many days.",
    )
    current_password: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="Your password. Required unless you call with a login session less than "
        f"{FRESH_LOGIN_MINUTES} minutes old.",
    )

    @field_validator("expires_at")
    @classmethod
    def _representable(cls, value: datetime | None) -> datetime | None:
        if value is None or value.tzinfo is None:
            return value
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError("must be before the year 10000 (UTC)") from None


class ApiTokenRead(Schema):
    id: uuid.UUID
    name: str
    prefix: str = Field(description="The token's first characters, to recognise it.")
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None


class SessionRead(Schema):
    id: uuid.UUID
    prefix: str = Field(description="The session token's first characters, to recognise it.")
    created_at: datetime
    expires_at: datetime
    last_used_at: datetime | None
    current: bool = Field(description="Whether this is the session making the request.")


class ApiTokenCreated(ApiTokenRead):
    token: str = Field(description="The token itself. Shown once: store it now.")
