"""Minting a personal API token: the password again (or a fresh login), and an expiry within
the administrator's maximum (IBP_MAX_TOKEN_DAYS)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import ApiToken
from app.security import FRESH_LOGIN_MINUTES, token_digest
from tests.api.helpers import assert_problem
from tests.factories import PASSWORD, auth_headers, create_user, login_session

OLD = timedelta(minutes=FRESH_LOGIN_MINUTES + 1)


async def _mint(client: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> httpx.Response:
    return await client.post("/tokens", json={"name": "script", **body}, headers=headers)


async def test_an_old_session_needs_the_current_password_to_mint_a_token(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    """A stolen 12-hour session must not turn itself into a token that outlives it."""
    user = await create_user(session)
    _, headers = await login_session(session, user, age=OLD)

    body = assert_problem(await _mint(client, headers), 403)
    assert "current_password" in body["detail"]
    wrong = assert_problem(await _mint(client, headers, current_password="guess"), 403)
    assert "current_password" in wrong["detail"]
    assert (await client.get("/tokens", headers=headers)).json()["total"] == 0

    created = await _mint(client, headers, current_password=PASSWORD)
    assert created.status_code == 201, created.text


async def test_a_fresh_login_mints_without_the_password_for_a_few_minutes(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session)
    login = await client.post("/auth/login", json={"email": user.email, "password": PASSWORD})
    token = login.json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    created = await _mint(client, headers)
    assert created.status_code == 201, created.text

    row = await session.scalar(select(ApiToken).where(ApiToken.token_hash == token_digest(token)))
    assert row is not None
    row.created_at -= OLD
    await session.flush()
    assert_problem(await _mint(client, headers), 403)


async def test_a_personal_token_needs_the_current_password_to_mint_another(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session)
    headers = await auth_headers(session, user)
    assert_problem(await _mint(client, headers), 403)
    assert (await _mint(client, headers, current_password=PASSWORD)).status_code == 201


async def test_expires_in_days_sets_the_expiry_and_it_is_enforced(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session)
    _, headers = await login_session(session, user)
    before = datetime.now(UTC)
    created = await _mint(client, headers, expires_in_days=7)
    assert created.status_code == 201, created.text
    body = created.json()
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert before + timedelta(days=7) <= expires_at <= datetime.now(UTC) + timedelta(days=7)
    token = {"Authorization": f"Bearer {body['token']}"}
    assert (await client.get("/me", headers=token)).status_code == 200

    row = await session.get(ApiToken, uuid.UUID(body["id"]))
    assert row is not None
    row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    await session.flush()
    problem = assert_problem(await client.get("/me", headers=token), 401)
    assert "expired" in problem["detail"]


async def test_expires_in_days_is_1_to_36500_and_excludes_expires_at(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await login_session(session, await create_user(session))
    for days in (0, -1, 36501):
        response = await _mint(client, headers, expires_in_days=days)
        assert_problem(response, 422, field="expires_in_days")
    expires_at = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    both = await _mint(client, headers, expires_at=expires_at, expires_in_days=3)
    assert_problem(both, 422, field="expires_in_days")
    assert (await client.get("/tokens", headers=headers)).json()["total"] == 0
    for days in (1, 36500):
        assert (await _mint(client, headers, expires_in_days=days)).status_code == 201


async def test_the_administrators_maximum_refuses_longer_and_endless_tokens(
    client: httpx.AsyncClient, session: AsyncSession, app: FastAPI
) -> None:
    app.state.settings = app.state.settings.model_copy(update={"max_token_days": 30})
    _, headers = await login_session(session, await create_user(session))
    now = datetime.now(UTC)

    body = assert_problem(await _mint(client, headers), 422, field="expires_at")
    assert "30 days" in body["detail"]
    assert_problem(await _mint(client, headers, expires_in_days=31), 422, field="expires_in_days")
    too_far = (now + timedelta(days=30, hours=1)).isoformat()
    assert_problem(await _mint(client, headers, expires_at=too_far), 422, field="expires_at")
    assert (await client.get("/tokens", headers=headers)).json()["total"] == 0

    assert (await _mint(client, headers, expires_in_days=30)).status_code == 201
    within = (now + timedelta(days=29)).isoformat()
    assert (await _mint(client, headers, expires_at=within)).status_code == 201
