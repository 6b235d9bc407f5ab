from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import Field

from app.schemas import RequestBody, Schema
from app.values import RestoreStatus, RestoreTarget


class RestoreCreate(RequestBody):
    target: RestoreTarget = Field(
        description=(
            "in_place: replace the instance's disks with the backup's content (the instance "
            "must be stopped). new_disk: write the restored images next to its disks."
        )
    )


class RestoreRead(Schema):
    id: uuid.UUID
    backup_id: uuid.UUID | None = Field(description="Null once the backup itself is deleted.")
    instance_id: uuid.UUID
    target: RestoreTarget
    status: RestoreStatus
    progress: int | None = Field(description="0-100 while in progress.")
    error: str | None = Field(description="Why it failed, in words for the instance's owner.")
    error_detail: str | None = Field(
        default=None,
        description="Admins only (null for others): the operator's detail, with the "
        "infrastructure named, when it says more than `error`.",
    )
    result: dict[str, str] = Field(
        description="new_disk: where each restored disk was written, e.g. {'vda': '/path'}."
    )
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
