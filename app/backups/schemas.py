from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from fastapi import Query
from pydantic import BaseModel, Field

from app.schemas import RequestBody
from app.values import BackupDevice, BackupStatus, BackupType

# Query filters of the backup lists (of an instance, of a policy, of everything).
StatusFilter = Annotated[BackupStatus | None, Query(alias="status")]
TypeFilter = Annotated[BackupType | None, Query(alias="type")]


class BackupFileRead(BaseModel):
    disk: str
    size_bytes: int
    sha256: str


class BackupRead(BaseModel):
    id: uuid.UUID
    instance_id: uuid.UUID
    instance_name: str
    policy_id: uuid.UUID | None
    chain_id: uuid.UUID | None
    parent_id: uuid.UUID | None
    type: BackupType
    status: BackupStatus
    manual: bool = Field(description="Taken with 'Backup now' rather than by the schedule.")
    backup_device: BackupDevice
    size_bytes: int | None
    size_human: str | None = Field(examples=["12.4 GB"])
    progress: int | None = Field(description="0-100 while in progress.")
    scheduled_for: datetime
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    error: str | None = Field(description="Why it failed, in words for the instance's owner.")
    error_detail: str | None = Field(
        description="Admins only (null for others): the operator's detail, with the "
        "infrastructure named, when it says more than `error`."
    )
    plan_reason: str | None = Field(description="Why this backup is a full or an incremental.")
    chain_reset_reason: str | None = Field(
        description="Set when a full had to start a new chain (lost checkpoint, disk change...)."
    )
    verified_at: datetime | None
    verify_ok: bool | None
    verify_error: str | None
    verify_error_detail: str | None = Field(description="Admins only, as `error_detail`.")
    files_missing_at: datetime | None = Field(
        description="When a check of the backup storage found a file of this backup missing."
    )
    restorable: bool = Field(
        description="Completed, and no file of it or of an earlier point of its chain is missing."
    )
    files: list[BackupFileRead]
    monthly_cost: str | None = Field(description="Decimal string; null without backup pricing.")
    hourly_cost: str | None = Field(description="monthly_cost / 730, decimal string.")


class BackupDeletion(BaseModel):
    backup_ids: list[uuid.UUID] = Field(description="Every backup being deleted, dependants too.")
    status: Literal[BackupStatus.DELETING] = BackupStatus.DELETING


class BackupNowRequest(RequestBody):
    type: Literal[BackupType.FULL] | None = Field(
        default=None,
        description="'full' starts a new chain; omitted or null follows the chain rules.",
    )
