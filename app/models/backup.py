"""Backups: chains (one full and its incrementals), backups, and one stored file per disk."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, utcnow
from app.values import BackupDevice, BackupStatus, BackupType, one_of


class BackupChain(IdMixin, Base):
    __tablename__ = "backup_chains"

    instance_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("instances.id"), index=True)
    policy_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("backup_policies.id", ondelete="SET NULL")
    )
    backup_device: Mapped[str] = mapped_column(String(16))
    # Disk targets and sizes when the chain started: a changed disk set forces a new chain.
    disks: Mapped[list[dict[str, object]]] = mapped_column(JSONB, default=list)
    storage_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("backup_storages.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Backup(IdMixin, Base):
    __tablename__ = "backups"
    __table_args__ = (
        CheckConstraint(one_of("type", BackupType), name="type"),
        CheckConstraint(one_of("status", BackupStatus), name="status"),
        CheckConstraint("progress IS NULL OR progress BETWEEN 0 AND 100", name="progress"),
        # A repeated tick cannot create a slot's backup twice.
        UniqueConstraint("instance_id", "scheduled_for", name="uq_backups_instance_slot"),
        Index("ix_backups_instance_created", "instance_id", "created_at", "id"),
        Index("ix_backups_policy_created", "policy_id", "created_at", "id"),
        Index("ix_backups_chain_id", "chain_id"),
        # An instance's newest completed backup (its recovery point), read every tick.
        Index(
            "ix_backups_instance_completed",
            "instance_id",
            "completed_at",
            postgresql_where="status = 'completed'",
        ),
        Index(
            "ix_backups_active",
            "status",
            postgresql_where=one_of(
                "status", (BackupStatus.PENDING, BackupStatus.IN_PROGRESS, BackupStatus.DELETING)
            ),
        ),
    )

    instance_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("instances.id"))
    policy_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("backup_policies.id", ondelete="SET NULL")
    )
    chain_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("backup_chains.id"))
    # Dependants are deleted with their parent; SET NULL lets deletions finish in any order.
    parent_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("backups.id", ondelete="SET NULL")
    )
    type: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=BackupStatus.PENDING)
    manual: Mapped[bool] = mapped_column(default=False)
    backup_device: Mapped[str] = mapped_column(String(16), default=BackupDevice.PRIMARY)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    progress: Mapped[int | None] = mapped_column(SmallInteger)
    scheduled_for: Mapped[datetime] = mapped_column()
    checkpoint_name: Mapped[str | None] = mapped_column(String(200))
    plan_reason: Mapped[str | None] = mapped_column(Text)
    chain_reset_reason: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)  # what the owner reads
    error_detail: Mapped[str | None] = mapped_column(Text)  # what an admin reads, when more
    storage_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("backup_storages.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    completed_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    verified_at: Mapped[datetime | None] = mapped_column()
    verify_ok: Mapped[bool | None] = mapped_column()
    verify_error: Mapped[str | None] = mapped_column(Text)
    verify_error_detail: Mapped[str | None] = mapped_column(Text)
    # The worker process that runs (or ran) it: a row whose worker is gone is failed and
    # cleaned up, not left until a timeout.
    worker_id: Mapped[uuid.UUID | None] = mapped_column()
    # Set by the storage reconciliation when a file of this backup is not on its storage.
    files_missing_at: Mapped[datetime | None] = mapped_column()
    delete_attempts: Mapped[int] = mapped_column(default=0)
    delete_error: Mapped[str | None] = mapped_column(Text)


class BackupFile(IdMixin, Base):
    __tablename__ = "backup_files"
    __table_args__ = (UniqueConstraint("backup_id", "disk_target"),)

    backup_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("backups.id", ondelete="CASCADE"))
    disk_target: Mapped[str] = mapped_column(String(32))
    object_key: Mapped[str] = mapped_column(String(1000))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
