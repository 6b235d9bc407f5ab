from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import EmailStr, Field

from app.schemas import RequestBody, Schema, TimeZoneName
from app.values import Role


class UserRead(Schema):
    id: uuid.UUID
    email: str
    name: str
    role: Role
    timezone: str
    created_at: datetime
    updated_at: datetime


class UserCreate(RequestBody):
    email: EmailStr
    name: str = Field(default="", max_length=200)
    password: str = Field(min_length=8, max_length=1024)
    role: Role = Role.USER
    timezone: TimeZoneName = "UTC"


class UserUpdate(RequestBody):
    email: EmailStr | None = None
    name: str | None = Field(default=None, max_length=200)
    password: str | None = Field(default=None, min_length=8, max_length=1024)
    role: Role | None = None
    timezone: TimeZoneName | None = None


class MeUpdate(RequestBody):
    name: str | None = Field(default=None, max_length=200)
    timezone: TimeZoneName | None = Field(
        default=None, description="IANA time zone; the user's policies are re-planned in it."
    )
