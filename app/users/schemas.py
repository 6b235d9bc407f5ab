from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import EmailStr, Field

from app.schemas import RequestBody, Schema, TimeZoneName, UserName
from app.values import Role


class UserRead(Schema):
    id: uuid.UUID
    email: str
    name: str
    role: Role
    timezone: str
    disabled: bool = Field(description="A disabled account can neither log in nor use a token.")
    created_at: datetime
    updated_at: datetime


class UserCreate(RequestBody):
    email: EmailStr
    name: UserName = ""
    password: str = Field(min_length=8, max_length=1024)
    role: Role = Role.USER
    timezone: TimeZoneName = "UTC"


class UserUpdate(RequestBody):
    email: EmailStr | None = None
    name: UserName | None = None
    password: str | None = Field(default=None, min_length=8, max_length=1024)
    role: Role | None = None
    timezone: TimeZoneName | None = None
    disabled: bool | None = Field(
        default=None,
        description="true ends the user's sessions and tokens and refuses new logins; "
        "false lets the user log in again.",
    )


class MeUpdate(RequestBody):
    name: UserName | None = None
    timezone: TimeZoneName | None = Field(
        default=None, description="IANA time zone; the user's policies are re-planned in it."
    )


class PasswordChange(RequestBody):
    """Changing the password ends every other session and all personal tokens."""

    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=8, max_length=1024)
