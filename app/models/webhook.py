"""Webhook endpoints (where a user's events are sent, signed) and each event's delivery to one."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, SmallInteger, String, Text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, TimestampMixin, utcnow
from app.values import DeliveryStatus, one_of


class WebhookEndpoint(IdMixin, TimestampMixin, Base):
    __tablename__ = "webhook_endpoints"
    __table_args__ = (
        CheckConstraint("cardinality(events) >= 1", name="events"),
        CheckConstraint("(disabled_at IS NULL) = enabled", name="disabled_when_not_enabled"),
        Index("ix_webhook_endpoints_owner_created", "owner_id", "created_at", "id"),
        Index("ix_webhook_endpoints_all_users", "all_users", postgresql_where="all_users"),
    )

    # Every endpoint has an owner. A user's endpoint receives the events of that user's
    # objects; `all_users` (set only by admins) receives everyone's, while its owner is an
    # active admin.
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    all_users: Mapped[bool] = mapped_column(default=False)
    url: Mapped[str] = mapped_column(String(2000))
    description: Mapped[str] = mapped_column(String(200), default="")
    events: Mapped[list[str]] = mapped_column(ARRAY(String(64)))
    # The signing secret `whsec_<base64>`, sealed by app.security.SecretBox: shown once.
    secret_encrypted: Mapped[str] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(default=True)
    disabled_at: Mapped[datetime | None] = mapped_column()
    disabled_reason: Mapped[str | None] = mapped_column(Text)


class WebhookDelivery(IdMixin, Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint(one_of("status", DeliveryStatus), name="status"),
        CheckConstraint("attempts >= 0", name="attempts"),
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at"),
        # The worker finds due deliveries through this index only.
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where="status = 'pending'",
        ),
        # The minute tick's pruning of the finished log.
        Index(
            "ix_webhook_deliveries_finished",
            "completed_at",
            postgresql_where="status <> 'pending'",
        ),
    )

    endpoint_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    event_type: Mapped[str] = mapped_column(String(64))
    # The `webhook-id` header: the event's id, the same for every endpoint and every attempt,
    # so a receiver can drop a repeat.
    message_id: Mapped[str] = mapped_column(String(64))
    # The body sent: {"type", "timestamp", "data"} (Standard Webhooks).
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(SmallInteger, default=0)
    # While pending: when the next attempt is due. A worker sending it pushes this forward
    # first (its claim), so a worker that dies mid-attempt only delays the retry.
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    last_attempt_at: Mapped[datetime | None] = mapped_column()
    last_response_code: Mapped[int | None] = mapped_column(SmallInteger)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column()
