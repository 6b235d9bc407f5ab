from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from app.schemas import Name, RequestBody, Schema
from app.values import BackupStatus, InstanceStatus, Protection


# In requests and in reads: a RequestBody, so that its fields are strict.
class DiskSpec(RequestBody):
    model_config = ConfigDict(from_attributes=True)

    target: str = Field(pattern=r"^[a-z]{1,4}[a-z0-9]{1,6}$", examples=["vda"])
    boot: bool = False
    size_bytes: int = Field(ge=0, le=2**60)


def _one_boot_disk(disks: list[DiskSpec]) -> list[DiskSpec]:
    targets = [d.target for d in disks]
    if len(set(targets)) != len(targets):
        raise ValueError("disk targets must be unique")
    if disks and sum(d.boot for d in disks) != 1:
        raise ValueError("exactly one disk must be the boot disk")
    return disks


class InstanceRead(Schema):
    id: uuid.UUID
    name: str
    owner_id: uuid.UUID
    hypervisor_id: uuid.UUID
    domain_name: str
    status: str
    disks: list[DiskSpec]
    backup_policy_id: uuid.UUID | None
    last_good_backup_at: datetime | None = Field(
        description="When its newest completed backup (any kind, files present) completed."
    )
    protection: Protection | None = Field(
        description="Against its policy's expected interval: 'protected', 'at_risk' (the last "
        "good backup is older than that) or 'unprotected' (none). Null without a policy. "
        "Evaluated by the scheduler every minute and when a backup completes."
    )
    protection_since: datetime | None = Field(description="Since when it is in that state.")
    created_at: datetime
    updated_at: datetime


class InstanceBrief(Schema):
    id: uuid.UUID
    name: str
    status: str


class InstanceCreate(RequestBody):
    name: Name
    owner_id: uuid.UUID
    hypervisor_id: uuid.UUID
    domain_name: str = Field(min_length=1, max_length=200, pattern=r"^[^\s/\x00]+$")
    status: InstanceStatus = InstanceStatus.DEPLOYED
    disks: list[DiskSpec] = Field(default_factory=list, max_length=64)

    _disks = field_validator("disks")(_one_boot_disk)


class InstanceUpdate(RequestBody):
    name: Name | None = None
    owner_id: uuid.UUID | None = Field(
        default=None, description="Changing the owner detaches the instance from its policy."
    )
    transfer_backups: bool = Field(
        default=False,
        description="Required (true) to change the owner of an instance that has backups: "
        "they go with it to the new owner, who can then read and restore them. Without it the "
        "change is refused (409); delete the backups first to hand over the instance alone.",
    )
    hypervisor_id: uuid.UUID | None = None
    domain_name: str | None = Field(
        default=None, min_length=1, max_length=200, pattern=r"^[^\s/\x00]+$"
    )
    status: InstanceStatus | None = None
    disks: list[DiskSpec] | None = Field(default=None, max_length=64)

    @field_validator("disks")
    @classmethod
    def _check_disks(cls, disks: list[DiskSpec] | None) -> list[DiskSpec] | None:
        return None if disks is None else _one_boot_disk(disks)


class InstanceDeletion(Schema):
    """`DELETE /instances/{id}?delete_backups=true` of an instance with backups."""

    backup_ids: list[uuid.UUID] = Field(
        description="Its backups, being deleted; the instance goes when their files are removed."
    )
    status: Literal[BackupStatus.DELETING] = BackupStatus.DELETING
