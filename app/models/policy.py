"""Backup policies: the schedule (owner's local hour), chain length, retention, status."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, TimestampMixin
from app.scheduling import Schedule
from app.values import BackupDevice, Frequency, PolicyStatus, Weekday, one_of


class BackupPolicy(IdMixin, TimestampMixin, Base):
    __tablename__ = "backup_policies"
    __table_args__ = (
        CheckConstraint(one_of("frequency", Frequency), name="frequency"),
        CheckConstraint("hour BETWEEN 0 AND 23", name="hour"),
        CheckConstraint(
            "(frequency = 'weekly') = (day_of_week IS NOT NULL)", name="weekly_needs_day"
        ),
        CheckConstraint(f"day_of_week IS NULL OR {one_of('day_of_week', Weekday)}", name="weekday"),
        CheckConstraint("max_incremental_chain BETWEEN 0 AND 30", name="chain"),
        CheckConstraint("retention_count BETWEEN 1 AND 365", name="retention"),
        CheckConstraint(one_of("backup_device", BackupDevice), name="device"),
        CheckConstraint(one_of("status", PolicyStatus), name="status"),
        # The tick finds due policies through this index, never by scanning all of them.
        Index(
            "ix_backup_policies_due",
            "next_check_at",
            postgresql_where="status <> 'paused'",
        ),
        # List pages (newest first) read these in order instead of sorting every policy.
        Index("ix_backup_policies_owner_created", "owner_id", "created_at", "id"),
        Index("ix_backup_policies_created", "created_at", "id"),
    )

    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    name: Mapped[str] = mapped_column(String(200))
    frequency: Mapped[str] = mapped_column(String(16))
    hour: Mapped[int] = mapped_column()
    day_of_week: Mapped[str | None] = mapped_column(String(16))
    max_incremental_chain: Mapped[int] = mapped_column(default=6)
    retention_count: Mapped[int] = mapped_column(default=3)
    backup_device: Mapped[str] = mapped_column(String(16), default=BackupDevice.PRIMARY)
    status: Mapped[str] = mapped_column(String(16), default=PolicyStatus.ACTIVE)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None] = mapped_column()
    # When the policy left Error (a later completed backup of every instance); NULL while the
    # last error is current. A new error clears it.
    last_error_resolved_at: Mapped[datetime | None] = mapped_column()
    # The next run that takes a backup (what the owner is shown) ...
    next_run_at: Mapped[datetime | None] = mapped_column()
    # ... and the next local day at the hour, when the tick looks at the policy: a day that
    # takes nothing still advances chains and catches instances without a usable backup.
    next_check_at: Mapped[datetime | None] = mapped_column()
    # Runs the scheduler skipped (overlap, chain full, missed during downtime): visible, not silent.
    skipped_runs: Mapped[int] = mapped_column(default=0)
    last_skip_reason: Mapped[str | None] = mapped_column(Text)
    last_skip_at: Mapped[datetime | None] = mapped_column()

    @property
    def schedule(self) -> Schedule:
        return Schedule(
            Frequency(self.frequency),
            self.hour,
            Weekday(self.day_of_week) if self.day_of_week is not None else None,
        )
