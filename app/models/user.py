"""Users (admins and end users) and their API/session tokens."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, TimestampMixin
from app.values import Role, TokenKind, one_of


class User(IdMixin, TimestampMixin, Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint(one_of("role", Role), name="role"),)

    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default=Role.USER)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    # Set by an admin: the account can neither log in nor use a token until it is cleared.
    disabled_at: Mapped[datetime | None] = mapped_column()

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN

    @property
    def disabled(self) -> bool:
        return self.disabled_at is not None


class ApiToken(IdMixin, Base):
    __tablename__ = "api_tokens"
    __table_args__ = (
        CheckConstraint(one_of("kind", TokenKind), name="kind"),
        Index("ix_api_tokens_user_id_kind", "user_id", "kind"),
    )

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200), default="")
    # sha256 of the whole token: tokens are 256-bit random, so a fast hash is enough.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column()
    expires_at: Mapped[datetime | None] = mapped_column()
    last_used_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()
