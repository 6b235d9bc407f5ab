"""There is always an admin: the last one cannot be demoted or deleted, not even by two admins
stepping down, or deleting each other, at the same moment (409)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.auth.service import Caller
from app.config import Settings
from app.db import build_sessionmaker
from app.errors import Conflict
from app.main import create_app
from app.models import ApiToken, User
from app.users.schemas import UserUpdate
from app.users.service import update_user
from app.values import Role
from tests.api.helpers import admin_with_headers, assert_problem
from tests.factories import auth_headers, create_admin


async def test_the_last_admin_cannot_demote_itself(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    first, first_headers = await admin_with_headers(session)
    second, second_headers = await admin_with_headers(session)

    stepped_down = await client.patch(
        f"/users/{first.id}", json={"role": "user"}, headers=first_headers
    )
    assert stepped_down.status_code == 200, stepped_down.text

    refused = await client.patch(
        f"/users/{second.id}", json={"role": "user"}, headers=second_headers
    )
    body = assert_problem(refused, 409)
    assert "only admin" in body["detail"]
    await session.refresh(second)
    assert second.role == Role.ADMIN


async def test_a_disabled_admin_does_not_count(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    """An admin whose account is disabled cannot manage anything: stepping down next to one
    would leave no admin who can."""
    active, headers = await admin_with_headers(session)
    dormant = await create_admin(session)
    disabled = await client.patch(f"/users/{dormant.id}", json={"disabled": True}, headers=headers)
    assert disabled.status_code == 200, disabled.text
    refused = await client.patch(f"/users/{active.id}", json={"role": "user"}, headers=headers)
    assert "only admin" in assert_problem(refused, 409)["detail"]


async def test_two_admins_demoting_themselves_at_once_leave_one(
    committed_engine: AsyncEngine,
) -> None:
    """The second change waits on the admin rows the first one locked, then sees that it left
    one admin only. Without the lock both would count the other one and both would go."""
    sessions = build_sessionmaker(committed_engine)
    async with sessions() as s:
        a, b = await create_admin(s), await create_admin(s)
        await s.commit()

    async def demote(session: AsyncSession, user_id: uuid.UUID) -> None:
        user = await session.get(User, user_id)
        assert user is not None
        own_token = ApiToken(id=uuid.uuid4(), user_id=user_id)  # each demotes itself
        await update_user(session, user, UserUpdate(role=Role.USER), Caller(user, own_token))

    async with sessions() as first, sessions() as second:
        await demote(first, a.id)  # flushed, not committed: it holds the admin rows
        racing = asyncio.create_task(demote(second, b.id))
        await asyncio.sleep(0.5)
        assert not racing.done(), "the second demotion should wait for the first"
        await first.commit()
        with pytest.raises(Conflict, match="only admin"):
            await racing

    async with sessions() as s:
        admins = (await s.scalars(select(User.id).where(User.role == Role.ADMIN))).all()
    assert admins == [b.id]


async def test_two_admins_deleting_each_other_at_once_leave_one(
    committed_engine: AsyncEngine, settings: Settings
) -> None:
    """Deleting yourself is refused already; the way to lose the last admin by deletion is two
    admins deleting each other in the same moment. One of them wins.

    Their tokens were used a moment ago, so the requests do not write their last_used_at: a
    request holding its own token row would make the other's delete (which takes the tokens
    with the user) wait on it, and PostgreSQL would end the pair as a deadlock instead."""
    sessions = build_sessionmaker(committed_engine)
    async with sessions() as s:
        a, b = await create_admin(s), await create_admin(s)
        headers = {a.id: await auth_headers(s, a), b.id: await auth_headers(s, b)}
        await s.execute(update(ApiToken).values(last_used_at=datetime.now(UTC)))
        await s.commit()

    async def delete(acting: uuid.UUID, target: uuid.UUID) -> httpx.Response:
        # Each request runs in its own app, with its own sessions on the real engine.
        application = create_app(settings)
        application.state.sessionmaker = build_sessionmaker(committed_engine)
        application.state.arq = None
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t/api/v1") as c:
            return await c.delete(f"/users/{target}", headers=headers[acting])

    responses = await asyncio.gather(delete(a.id, b.id), delete(b.id, a.id))

    assert sorted(r.status_code for r in responses) == [204, 409], [r.text for r in responses]
    assert_problem(next(r for r in responses if r.status_code == 409), 409)
    async with sessions() as s:
        admins = (await s.scalars(select(User.id).where(User.role == Role.ADMIN))).all()
    assert len(admins) == 1
