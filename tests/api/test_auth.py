"""Login, bearer authentication, session expiry and personal API tokens."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import ApiToken
from app.security import token_digest
from tests.api.helpers import assert_page, assert_problem, user_with_headers
from tests.factories import PASSWORD, auth_headers, create_user


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_login_returns_bearer_session_token(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session)
    before = datetime.now(UTC)
    response = await client.post("/auth/login", json={"email": user.email, "password": PASSWORD})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_at"}
    assert body["token_type"] == "bearer"
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert before + timedelta(hours=11) < expires_at < before + timedelta(hours=13)
    me = await client.get("/me", headers=bearer(body["access_token"]))
    assert me.status_code == 200
    assert me.json()["id"] == str(user.id)


async def test_login_email_is_case_insensitive(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session)
    response = await client.post(
        "/auth/login", json={"email": user.email.upper(), "password": PASSWORD}
    )
    assert response.status_code == 200, response.text


async def test_login_with_wrong_password_is_401_problem(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session)
    response = await client.post("/auth/login", json={"email": user.email, "password": "nope"})
    body = assert_problem(response, 401)
    assert body["detail"] == "Wrong email or password"


async def test_login_with_unknown_email_is_401_with_same_message(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/auth/login", json={"email": "ghost@example.com", "password": PASSWORD}
    )
    body = assert_problem(response, 401)
    assert body["detail"] == "Wrong email or password"


async def test_login_without_password_is_422_naming_the_field(client: httpx.AsyncClient) -> None:
    response = await client.post("/auth/login", json={"email": "a@example.com"})
    assert_problem(response, 422, field="password")


async def test_missing_token_is_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/me")
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"


async def test_non_bearer_scheme_is_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/me", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert_problem(response, 401)


async def test_invalid_token_is_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/me", headers=bearer("ibpt_not-a-real-token"))
    assert_problem(response, 401)


async def test_expired_session_token_is_401(
    client: httpx.AsyncClient, session: AsyncSession, app: FastAPI
) -> None:
    user = await create_user(session)
    login = await client.post("/auth/login", json={"email": user.email, "password": PASSWORD})
    token = login.json()["access_token"]
    row = await session.scalar(select(ApiToken).where(ApiToken.token_hash == token_digest(token)))
    assert row is not None and row.kind == "session"
    row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    await session.flush()
    response = await client.get("/me", headers=bearer(token))
    body = assert_problem(response, 401)
    assert "expired" in body["detail"]


async def test_session_lifetime_comes_from_settings(
    client: httpx.AsyncClient, session: AsyncSession, app: FastAPI
) -> None:
    app.state.settings = app.state.settings.model_copy(update={"session_lifetime_hours": 1.0})
    user = await create_user(session)
    before = datetime.now(UTC)
    login = await client.post("/auth/login", json={"email": user.email, "password": PASSWORD})
    expires_at = datetime.fromisoformat(login.json()["expires_at"])
    assert before + timedelta(minutes=59) < expires_at < before + timedelta(minutes=61)


async def test_login_sessions_are_not_listed_as_personal_tokens(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session)
    login = await client.post("/auth/login", json={"email": user.email, "password": PASSWORD})
    listed = await client.get("/tokens", headers=bearer(login.json()["access_token"]))
    assert listed.status_code == 200
    assert_page(listed.json(), total=0)


# --- personal tokens --------------------------------------------------------------------------


async def test_create_token_returns_plaintext_once_with_prefix(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    response = await client.post(
        "/tokens", json={"name": "ci", "current_password": PASSWORD}, headers=headers
    )
    assert response.status_code == 201, response.text
    body = response.json()
    token = body["token"]
    assert token.startswith("ibpt_")
    assert len(token) > 40
    assert token.startswith(body["prefix"])
    assert body["name"] == "ci"
    assert body["expires_at"] is None
    # Only the hash is stored.
    row = await session.get(ApiToken, uuid.UUID(body["id"]))
    assert row is not None
    assert row.token_hash == token_digest(token)
    assert token not in (row.token_hash, row.prefix)
    # The token works.
    me = await client.get("/me", headers=bearer(token))
    assert me.status_code == 200
    assert me.json()["id"] == str(user.id)


async def test_token_list_never_shows_the_token_or_its_hash(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    created = (
        await client.post(
            "/tokens", json={"name": "ci", "current_password": PASSWORD}, headers=headers
        )
    ).json()
    listed = await client.get("/tokens", headers=headers)
    assert listed.status_code == 200
    body = listed.json()
    assert_page(body, total=2)  # the factory's token and the new one
    text = listed.text
    assert created["token"] not in text
    assert token_digest(created["token"]) not in text
    for item in body["items"]:
        assert set(item) == {"id", "name", "prefix", "created_at", "expires_at", "last_used_at"}


async def test_deleted_token_is_revoked_and_then_401(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    created = (
        await client.post(
            "/tokens", json={"name": "ci", "current_password": PASSWORD}, headers=headers
        )
    ).json()
    deleted = await client.delete(f"/tokens/{created['id']}", headers=headers)
    assert deleted.status_code == 204
    response = await client.get("/me", headers=bearer(created["token"]))
    body = assert_problem(response, 401)
    assert "revoked" in body["detail"]
    listed = (await client.get("/tokens", headers=headers)).json()
    assert created["id"] not in [t["id"] for t in listed["items"]]
    again = await client.delete(f"/tokens/{created['id']}", headers=headers)
    assert_problem(again, 404)


async def test_user_cannot_delete_someone_elses_token(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    _, other_headers = await user_with_headers(session)
    created = (
        await client.post(
            "/tokens", json={"name": "x", "current_password": PASSWORD}, headers=other_headers
        )
    ).json()
    response = await client.delete(f"/tokens/{created['id']}", headers=headers)
    assert_problem(response, 404)
    assert (await client.get("/me", headers=bearer(created["token"]))).status_code == 200


async def test_using_a_token_sets_last_used_at(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    created = (
        await client.post(
            "/tokens", json={"name": "ci", "current_password": PASSWORD}, headers=headers
        )
    ).json()
    assert created["last_used_at"] is None
    before = datetime.now(UTC)
    assert (await client.get("/me", headers=bearer(created["token"]))).status_code == 200
    listed = (await client.get("/tokens", headers=headers)).json()
    item = next(t for t in listed["items"] if t["id"] == created["id"])
    assert item["last_used_at"] is not None
    assert datetime.fromisoformat(item["last_used_at"]) >= before - timedelta(seconds=1)


async def test_token_with_future_expiry_works_until_it_expires(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    expires = datetime.now(UTC) + timedelta(days=1)
    created = await client.post(
        "/tokens",
        json={"name": "short", "current_password": PASSWORD, "expires_at": expires.isoformat()},
        headers=headers,
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert datetime.fromisoformat(body["expires_at"]) == expires
    assert (await client.get("/me", headers=bearer(body["token"]))).status_code == 200
    row = await session.get(ApiToken, uuid.UUID(body["id"]))
    assert row is not None
    row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    await session.flush()
    assert_problem(await client.get("/me", headers=bearer(body["token"])), 401)


@pytest.mark.parametrize("delta", [timedelta(days=-1), timedelta(seconds=-1)])
async def test_token_expiring_in_the_past_is_422(
    client: httpx.AsyncClient, session: AsyncSession, delta: timedelta
) -> None:
    _, headers = await user_with_headers(session)
    expires = datetime.now(UTC) + delta
    response = await client.post(
        "/tokens",
        json={"name": "old", "current_password": PASSWORD, "expires_at": expires.isoformat()},
        headers=headers,
    )
    body = assert_problem(response, 422, field="expires_at")
    assert [e["field"] for e in body["errors"]] == ["expires_at"]


async def test_revoked_factory_token_is_401(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session)
    headers = await auth_headers(session, user)
    token = headers["Authorization"].split()[1]
    row = await session.scalar(select(ApiToken).where(ApiToken.token_hash == token_digest(token)))
    assert row is not None
    row.revoked_at = datetime.now(UTC)
    await session.flush()
    assert_problem(await client.get("/backup-policies", headers=headers), 401)


async def test_responses_with_a_token_are_not_stored_by_caches(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    login = await client.post("/auth/login", json={"email": user.email, "password": PASSWORD})
    assert login.status_code == 200, login.text
    assert login.headers["cache-control"] == "no-store"
    minted = await client.post(
        "/tokens", json={"name": "ci", "current_password": PASSWORD}, headers=headers
    )
    assert minted.status_code == 201, minted.text
    assert minted.headers["cache-control"] == "no-store"
