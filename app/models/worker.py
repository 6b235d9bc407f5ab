"""Running workers: each process says it is alive, so work on a hypervisor whose worker is gone
is noticed in minutes and cleaned up when it comes back."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, utcnow


class Worker(IdMixin, Base):
    __tablename__ = "workers"

    # None: a control-only worker (the tick, deletions).
    hypervisor_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("hypervisors.id", ondelete="CASCADE"), index=True
    )
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column()
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column()
    # The package version it runs (app.version); None for rows written before it was kept.
    version: Mapped[str | None] = mapped_column(String(64))
