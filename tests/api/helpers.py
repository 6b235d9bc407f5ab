"""Helpers for the API tests: problem assertions and the few rows tests/factories.py lacks."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import BackupStorage, User
from app.security import secret_box
from tests.factories import auth_headers, create_admin, create_user

PROBLEM = "application/problem+json"


def assert_problem(
    response: httpx.Response, status: int, *, field: str | None = None
) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status (and, if given, names the field)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM), response.headers
    body: dict[str, Any] = response.json()
    for key in ("type", "title", "status"):
        assert key in body, body
    assert body["status"] == status
    if field is not None:
        fields = [e.get("field") for e in body.get("errors") or []]
        assert field in fields or field in (body.get("detail") or ""), body
    return body


def assert_page(body: dict[str, Any], *, total: int, limit: int = 50, offset: int = 0) -> None:
    assert set(body) == {"items", "total", "limit", "offset"}, body
    assert body["total"] == total
    assert body["limit"] == limit
    assert body["offset"] == offset


async def user_with_headers(session: AsyncSession, **overrides: Any) -> tuple[User, dict[str, str]]:
    user = await create_user(session, **overrides)
    return user, await auth_headers(session, user)


async def admin_with_headers(
    session: AsyncSession, **overrides: Any
) -> tuple[User, dict[str, str]]:
    admin = await create_admin(session, **overrides)
    return admin, await auth_headers(session, admin)


async def create_storage(
    session: AsyncSession,
    kind: str = "local",
    config: dict[str, Any] | None = None,
    secrets: dict[str, Any] | None = None,
    **overrides: Any,
) -> BackupStorage:
    storage = BackupStorage(
        id=uuid.uuid4(),
        name=overrides.pop("name", f"st-{uuid.uuid4().hex[:8]}"),
        kind=kind,
        config=config if config is not None else {"path": "/srv/backups"},
        secrets_encrypted=secret_box().encrypt(secrets) if secrets else None,
        status="unknown",
        **overrides,
    )
    session.add(storage)
    await session.flush()
    return storage


class Upload:
    """A streamed request body of `size` spaces that counts how much of it the server pulled."""

    def __init__(self, size: int, chunk: int = 1024) -> None:
        self.size, self.chunk = size, chunk
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.sent < self.size:
            piece = b" " * min(self.chunk, self.size - self.sent)
            self.sent += len(piece)
            yield piece
