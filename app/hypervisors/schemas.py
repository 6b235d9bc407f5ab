from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import Field

from app.schemas import RequestBody, Schema


class HypervisorRead(Schema):
    id: uuid.UUID
    name: str
    location_id: uuid.UUID
    libvirt_uri: str
    backup_storage_id: uuid.UUID | None
    max_concurrent_backups: int
    scratch_dir: str
    created_at: datetime
    updated_at: datetime


class HypervisorCreate(RequestBody):
    name: str = Field(min_length=1, max_length=200)
    location_id: uuid.UUID
    libvirt_uri: str = Field(
        default="qemu:///system", min_length=1, max_length=500, pattern=r"^[a-z0-9+]+://"
    )
    backup_storage_id: uuid.UUID | None = None
    max_concurrent_backups: int = Field(default=2, ge=1, le=64)
    scratch_dir: str = Field(
        default="/var/lib/ibp/scratch", min_length=2, max_length=1000, pattern=r"^/[^\x00]*$"
    )


class HypervisorUpdate(RequestBody):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    location_id: uuid.UUID | None = None
    libvirt_uri: str | None = Field(
        default=None, min_length=1, max_length=500, pattern=r"^[a-z0-9+]+://"
    )
    backup_storage_id: uuid.UUID | None = None
    max_concurrent_backups: int | None = Field(default=None, ge=1, le=64)
    scratch_dir: str | None = Field(
        default=None, min_length=2, max_length=1000, pattern=r"^/[^\x00]*$"
    )
