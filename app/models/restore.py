"""Restores: a backup's chain rebuilt onto the instance's disk, or next to it."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, SmallInteger, String, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, utcnow
from app.values import ACTIVE, RestoreStatus, RestoreTarget, one_of


class Restore(IdMixin, Base):
    __tablename__ = "restores"
    __table_args__ = (
        CheckConstraint(one_of("target", RestoreTarget), name="target"),
        CheckConstraint(one_of("status", RestoreStatus), name="status"),
        CheckConstraint("progress IS NULL OR progress BETWEEN 0 AND 100", name="progress"),
        Index("ix_restores_instance_created", "instance_id", "created_at"),
        Index(
            "ix_restores_active",
            "instance_id",
            postgresql_where=one_of("status", ACTIVE),
        ),
    )

    # The restore's record outlives the backup it came from.
    backup_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("backups.id", ondelete="SET NULL")
    )
    instance_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("instances.id"))
    requested_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    target: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=RestoreStatus.PENDING)
    progress: Mapped[int | None] = mapped_column(SmallInteger)
    error: Mapped[str | None] = mapped_column(Text)  # what the owner reads
    error_detail: Mapped[str | None] = mapped_column(Text)  # what an admin reads, when more
    # new_disk: where each restored disk was written, {"vda": "/path/...qcow2"}.
    result: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    completed_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    worker_id: Mapped[uuid.UUID | None] = mapped_column()  # as Backup.worker_id
