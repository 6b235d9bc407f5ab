"""All ORM tables, in one package so Alembic and every service see the same metadata."""

from app.models.backup import Backup, BackupChain, BackupFile
from app.models.base import Base
from app.models.inventory import (
    BackupStorage,
    Hypervisor,
    Instance,
    InstanceDisk,
    Location,
    ProtectionChange,
)
from app.models.policy import BackupPolicy
from app.models.restore import Restore
from app.models.user import ApiToken, User
from app.models.webhook import WebhookDelivery, WebhookEndpoint
from app.models.worker import Worker

__all__ = [
    "ApiToken",
    "Backup",
    "BackupChain",
    "BackupFile",
    "BackupPolicy",
    "BackupStorage",
    "Base",
    "Hypervisor",
    "Instance",
    "InstanceDisk",
    "Location",
    "ProtectionChange",
    "Restore",
    "User",
    "WebhookDelivery",
    "WebhookEndpoint",
    "Worker",
]
