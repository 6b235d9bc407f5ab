"""The platform's inventory: locations, backup storages, hypervisors, instances and their disks."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Numeric,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.models.base import Base, IdMixin, TimestampMixin
from app.values import InstanceStatus, Protection, StorageKind, StorageStatus, one_of


class Location(IdMixin, TimestampMixin, Base):
    __tablename__ = "locations"

    name: Mapped[str] = mapped_column(String(200), unique=True)
    backup_price_per_gb_month: Mapped[Decimal | None] = mapped_column(Numeric(14, 6))


class BackupStorage(IdMixin, TimestampMixin, Base):
    __tablename__ = "backup_storages"
    __table_args__ = (
        CheckConstraint(one_of("kind", StorageKind), name="kind"),
        CheckConstraint(one_of("status", StorageStatus), name="status"),
    )

    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    # Non-secret settings only; secrets live encrypted in `secrets_encrypted`.
    config: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    secrets_encrypted: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=StorageStatus.UNKNOWN)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_checked_at: Mapped[datetime | None] = mapped_column()


class Hypervisor(IdMixin, TimestampMixin, Base):
    __tablename__ = "hypervisors"
    __table_args__ = (CheckConstraint("max_concurrent_backups >= 1", name="max_concurrent"),)

    name: Mapped[str] = mapped_column(String(200), unique=True)
    location_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("locations.id"), index=True)
    libvirt_uri: Mapped[str] = mapped_column(String(500), default="qemu:///system")
    backup_storage_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("backup_storages.id"), index=True
    )
    max_concurrent_backups: Mapped[int] = mapped_column(default=2)
    scratch_dir: Mapped[str] = mapped_column(String(1000), default="/var/lib/ibp/scratch")


class Instance(IdMixin, TimestampMixin, Base):
    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("hypervisor_id", "domain_name", name="uq_instances_hypervisor_domain"),
        Index("ix_instances_created", "created_at", "id"),
        CheckConstraint(
            f"protection IS NULL OR {one_of('protection', Protection)}", name="protection"
        ),
        Index("ix_instances_protection", "protection", postgresql_where="protection IS NOT NULL"),
    )

    name: Mapped[str] = mapped_column(String(200))
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    hypervisor_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("hypervisors.id"), index=True)
    domain_name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(32), default=InstanceStatus.DEPLOYED)
    # One column, so "one policy per instance" cannot be broken by any race.
    backup_policy_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("backup_policies.id", ondelete="SET NULL"), index=True
    )
    # Deleted with its backups: hidden from the API, the row goes once the deletion jobs have
    # removed the last backup's files (remove_instance_when_emptied in app/engine/lifecycle.py).
    deleting_at: Mapped[datetime | None] = mapped_column()
    # The recovery point, as the scheduler last evaluated it (app/engine/protection.py): the
    # newest completed backup, and the state against the policy's expected interval (NULL
    # without a policy), since when.
    last_good_backup_at: Mapped[datetime | None] = mapped_column()
    protection: Mapped[str | None] = mapped_column(String(16))
    protection_since: Mapped[datetime | None] = mapped_column()

    disks: Mapped[list[InstanceDisk]] = relationship(
        lazy="raise", cascade="all, delete-orphan", order_by="InstanceDisk.target"
    )


class InstanceDisk(IdMixin, Base):
    __tablename__ = "instance_disks"
    __table_args__ = (UniqueConstraint("instance_id", "target"),)

    instance_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"))
    target: Mapped[str] = mapped_column(String(32))
    boot: Mapped[bool] = mapped_column(default=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)


class ProtectionChange(IdMixin, Base):
    """One change of an instance's protection state, as the scheduler found it."""

    __tablename__ = "protection_changes"
    __table_args__ = (
        CheckConstraint(
            f"from_state IS NULL OR {one_of('from_state', Protection)}", name="from_state"
        ),
        CheckConstraint(f"to_state IS NULL OR {one_of('to_state', Protection)}", name="to_state"),
        Index("ix_protection_changes_instance_changed", "instance_id", "changed_at"),
    )

    instance_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"))
    policy_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("backup_policies.id", ondelete="SET NULL")
    )
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str | None] = mapped_column(String(16))
    last_good_backup_at: Mapped[datetime | None] = mapped_column()
    changed_at: Mapped[datetime] = mapped_column()
