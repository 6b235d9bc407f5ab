"""The words the catalog stores: one StrEnum per kind of value.

The models' CHECK constraints, the API schemas and the services all take their words from
here, so a status or a frequency is spelled once. StrEnum members are plain strings to the
database, to JSON and in comparisons.
"""

from __future__ import annotations

from enum import StrEnum


class Frequency(StrEnum):
    DAILY = "daily"
    WEEKLY = "weekly"


class Weekday(StrEnum):
    """In the order the UI lists them (Sunday first)."""

    SUNDAY = "sunday"
    MONDAY = "monday"
    TUESDAY = "tuesday"
    WEDNESDAY = "wednesday"
    THURSDAY = "thursday"
    FRIDAY = "friday"
    SATURDAY = "saturday"


class BackupDevice(StrEnum):
    PRIMARY = "primary"  # the boot disk only
    ALL = "all"

    def covers(self, boot: bool) -> bool:
        """Whether a disk (the boot disk or not) is copied by a backup of this device."""
        return self == BackupDevice.ALL or boot


class PolicyStatus(StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    ERROR = "error"


class BackupType(StrEnum):
    FULL = "full"
    INCREMENTAL = "incremental"


class BackupStatus(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    DELETING = "deleting"  # its files are being removed; the row goes when they are


class RestoreStatus(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


#: Work that holds an instance, backup or restore: queued or running.
ACTIVE = ("pending", "in_progress")


class RestoreTarget(StrEnum):
    IN_PLACE = "in_place"
    NEW_DISK = "new_disk"


class InstanceStatus(StrEnum):
    DEPLOYED = "deployed"
    SUSPENDED = "suspended"
    STOPPED = "stopped"
    BUILDING = "building"
    ERROR = "error"


class Protection(StrEnum):
    """An instance's backups against its policy's expected interval (recovery-point objective)."""

    PROTECTED = "protected"  # the last good backup is within the expected interval
    AT_RISK = "at_risk"  # it is older than that
    UNPROTECTED = "unprotected"  # there is none


class StorageKind(StrEnum):
    LOCAL = "local"
    NFS = "nfs"
    S3 = "s3"
    SFTP = "sftp"
    FTP = "ftp"


class StorageStatus(StrEnum):
    UNKNOWN = "unknown"
    CHECKING = "checking"  # a check job is queued or running on a hypervisor's worker
    OK = "ok"
    ERROR = "error"


class Role(StrEnum):
    ADMIN = "admin"
    USER = "user"


class TokenKind(StrEnum):
    SESSION = "session"
    PERSONAL = "personal"


class WebhookEvent(StrEnum):
    """What an endpoint may subscribe to (`webhook.test` is sent only on request)."""

    BACKUP_COMPLETED = "backup.completed"
    BACKUP_FAILED = "backup.failed"
    POLICY_ERROR = "policy.error"
    POLICY_RECOVERED = "policy.recovered"
    PROTECTION_AT_RISK = "protection.at_risk"
    PROTECTION_RESTORED = "protection.restored"
    RESTORE_COMPLETED = "restore.completed"
    RESTORE_FAILED = "restore.failed"


WEBHOOK_TEST = "webhook.test"


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # waiting for its next attempt
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # every attempt failed, or its endpoint was disabled


def one_of(column: str, values: type[StrEnum] | tuple[str, ...]) -> str:
    """The SQL of `column` holding one of `values` (CHECK constraints, partial indexes)."""
    words = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({words})"
