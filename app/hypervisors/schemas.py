from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, Field

from app.schemas import Name, RequestBody, Schema
from app.virt.backup import SCRATCH_DIR_MAX
from app.virt.uri import check_libvirt_uri

LibvirtUri = Annotated[
    str,
    Field(
        min_length=1,
        max_length=500,
        description="qemu:///system (the worker runs on the hypervisor), or "
        "qemu+ssh://[user@]host[:port]/system or qemu+tls://host[:port]/system; "
        "parameters: no_tty (ssh), mode. Anything else is refused.",
    ),
    AfterValidator(check_libvirt_uri),
]
ScratchDir = Annotated[
    str,
    Field(
        min_length=2,
        max_length=SCRATCH_DIR_MAX,
        pattern=r"^/[^\x00]*$",
        description="An absolute folder on the hypervisor for each backup's NBD socket and "
        "copy-before-write files (what the VM overwrites while its backup runs); at most "
        f"{SCRATCH_DIR_MAX} characters, as a unix socket's path is short.",
    ),
]


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
    name: Name
    location_id: uuid.UUID
    libvirt_uri: LibvirtUri = "qemu:///system"
    backup_storage_id: uuid.UUID | None = None
    max_concurrent_backups: int = Field(default=2, ge=1, le=64)
    scratch_dir: ScratchDir = "/var/lib/ibp/scratch"


class HypervisorUpdate(RequestBody):
    name: Name | None = None
    location_id: uuid.UUID | None = None
    libvirt_uri: LibvirtUri | None = None
    backup_storage_id: uuid.UUID | None = None
    max_concurrent_backups: int | None = Field(default=None, ge=1, le=64)
    scratch_dir: ScratchDir | None = None
