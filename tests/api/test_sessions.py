"""Ending credentials: logout, listing and revoking login sessions, and what a password change
or a disabled account does to the sessions and personal tokens already handed out."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from app.users.service import ensure_admin
from tests.api.helpers import admin_with_headers, assert_page, assert_problem
from tests.factories import PASSWORD, auth_headers, create_user, login_session

NEW_PASSWORD = "a brand new password"


async def _status(client: httpx.AsyncClient, headers: dict[str, str]) -> int:
    return (await client.get("/me", headers=headers)).status_code


async def _login(client: httpx.AsyncClient, email: str, password: str) -> httpx.Response:
    return await client.post("/auth/login", json={"email": email, "password": password})


# --- a password change ------------------------------------------------------------------------


async def test_admin_password_reset_ends_the_users_sessions_and_tokens(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, admin_headers = await admin_with_headers(session)
    user = await create_user(session)
    login = await _login(client, user.email, PASSWORD)
    session_headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
    token_headers = await auth_headers(session, user)
    assert await _status(client, session_headers) == 200
    assert await _status(client, token_headers) == 200

    reset = await client.patch(
        f"/users/{user.id}", json={"password": NEW_PASSWORD}, headers=admin_headers
    )
    assert reset.status_code == 200, reset.text

    for headers in (session_headers, token_headers):
        body = assert_problem(await client.get("/me", headers=headers), 401)
        assert "revoked" in body["detail"]
    assert (await _login(client, user.email, NEW_PASSWORD)).status_code == 200
    # The admin's own token is untouched.
    assert await _status(client, admin_headers) == 200


async def test_admin_resetting_own_password_keeps_the_calling_token(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    admin, admin_headers = await admin_with_headers(session)
    _, other_session = await login_session(session, admin)
    reset = await client.patch(
        f"/users/{admin.id}", json={"password": NEW_PASSWORD}, headers=admin_headers
    )
    assert reset.status_code == 200, reset.text
    assert await _status(client, admin_headers) == 200
    assert_problem(await client.get("/me", headers=other_session), 401)


async def test_own_password_change_keeps_this_session_and_ends_the_others(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    """The session making the change survives (its holder just gave the password); other
    sessions and every personal token end: after a compromise, the intruder's are among them."""
    user = await create_user(session)
    _, this = await login_session(session, user)
    _, other = await login_session(session, user)
    token = await auth_headers(session, user)

    changed = await client.post(
        "/me/password",
        json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
        headers=this,
    )
    assert changed.status_code == 204, changed.text

    assert await _status(client, this) == 200
    assert_problem(await client.get("/me", headers=other), 401)
    assert_problem(await client.get("/me", headers=token), 401)
    assert_problem(await _login(client, user.email, PASSWORD), 401)
    assert (await _login(client, user.email, NEW_PASSWORD)).status_code == 200


async def test_own_password_change_with_a_wrong_current_password_is_403_and_ends_nothing(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session)
    _, this = await login_session(session, user)
    _, other = await login_session(session, user)
    changed = await client.post(
        "/me/password",
        json={"current_password": "not my password", "new_password": NEW_PASSWORD},
        headers=this,
    )
    body = assert_problem(changed, 403)
    assert "current_password" in body["detail"]
    assert await _status(client, other) == 200
    assert (await _login(client, user.email, PASSWORD)).status_code == 200


async def test_create_admin_with_a_new_password_ends_the_accounts_sessions_and_tokens(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    admin, headers = await admin_with_headers(session)
    _, login = await login_session(session, admin)
    await ensure_admin(session, admin.email, PASSWORD)  # scripts/dev, at every start
    await session.flush()
    assert await _status(client, headers) == 200
    await ensure_admin(session, admin.email, NEW_PASSWORD)
    await session.flush()
    assert_problem(await client.get("/me", headers=headers), 401)
    assert_problem(await client.get("/me", headers=login), 401)


# --- a disabled account -----------------------------------------------------------------------


async def test_disabling_a_user_ends_sessions_and_tokens_and_refuses_login(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, admin_headers = await admin_with_headers(session)
    user = await create_user(session)
    _, login = await login_session(session, user)
    token = await auth_headers(session, user)

    disabled = await client.patch(
        f"/users/{user.id}", json={"disabled": True}, headers=admin_headers
    )
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["disabled"] is True

    assert_problem(await client.get("/me", headers=login), 401)
    assert_problem(await client.get("/me", headers=token), 401)
    body = assert_problem(await _login(client, user.email, PASSWORD), 401)
    assert "disabled" in body["detail"]
    # A wrong password still gets the usual words: disabling reveals nothing to a guesser.
    wrong = assert_problem(await _login(client, user.email, "guess"), 401)
    assert wrong["detail"] == "Wrong email or password"

    enabled = await client.patch(
        f"/users/{user.id}", json={"disabled": False}, headers=admin_headers
    )
    assert enabled.json()["disabled"] is False
    assert (await _login(client, user.email, PASSWORD)).status_code == 200
    # Enabling does not bring the ended credentials back.
    assert_problem(await client.get("/me", headers=token), 401)


async def test_an_admin_cannot_disable_their_own_account(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    admin, headers = await admin_with_headers(session)
    response = await client.patch(f"/users/{admin.id}", json={"disabled": True}, headers=headers)
    assert_problem(response, 409)
    assert await _status(client, headers) == 200


# --- logout -----------------------------------------------------------------------------------


async def test_logout_ends_the_calling_session_only(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session)
    first = (await _login(client, user.email, PASSWORD)).json()["access_token"]
    _, second = await login_session(session, user)
    headers = {"Authorization": f"Bearer {first}"}

    response = await client.post("/auth/logout", headers=headers)
    assert response.status_code == 204, response.text

    body = assert_problem(await client.get("/me", headers=headers), 401)
    assert "revoked" in body["detail"]
    assert await _status(client, second) == 200


async def test_logout_with_a_personal_token_is_409_and_keeps_the_token(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session)
    token = await auth_headers(session, user)
    body = assert_problem(await client.post("/auth/logout", headers=token), 409)
    assert "DELETE /tokens" in body["detail"]
    assert await _status(client, token) == 200


# --- listing and revoking sessions ------------------------------------------------------------


async def test_sessions_are_listed_with_the_current_one_marked(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session)
    this_token = (await _login(client, user.email, PASSWORD)).json()["access_token"]
    this = {"Authorization": f"Bearer {this_token}"}
    other, _ = await login_session(session, user, age=timedelta(hours=1))
    await login_session(session, user, age=timedelta(hours=13))  # expired
    revoked, _ = await login_session(session, user)
    revoked.revoked_at = datetime.now(UTC)
    await auth_headers(session, user)  # a personal token: not a session
    await login_session(session, await create_user(session))  # someone else's
    await session.flush()

    response = await client.get("/auth/sessions", headers=this)
    assert response.status_code == 200, response.text
    body = response.json()
    assert_page(body, total=2)
    items = body["items"]
    for item in items:
        assert set(item) == {"id", "prefix", "created_at", "last_used_at", "expires_at", "current"}
    current = [item for item in items if item["current"]]
    assert len(current) == 1
    assert this_token.startswith(current[0]["prefix"]) and len(current[0]["prefix"]) >= 8
    assert current[0]["last_used_at"] is not None
    assert datetime.fromisoformat(current[0]["expires_at"]) > datetime.now(UTC)
    assert [item["id"] for item in items if not item["current"]] == [str(other.id)]
    assert this_token not in response.text


async def test_a_session_revoked_from_another_answers_401(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session)
    _, this = await login_session(session, user)
    lost, lost_headers = await login_session(session, user)
    token = await client.post("/tokens", json={"name": "ci"}, headers=this)
    token_id = token.json()["id"]

    response = await client.delete(f"/auth/sessions/{lost.id}", headers=this)
    assert response.status_code == 204, response.text

    assert_problem(await client.get("/me", headers=lost_headers), 401)
    assert await _status(client, this) == 200
    listed = (await client.get("/auth/sessions", headers=this)).json()
    assert str(lost.id) not in [item["id"] for item in listed["items"]]
    assert_problem(await client.delete(f"/auth/sessions/{lost.id}", headers=this), 404)
    # A personal token is not a session: revoked with DELETE /tokens/{id} only.
    assert_problem(await client.delete(f"/auth/sessions/{token_id}", headers=this), 404)
    token_headers = {"Authorization": f"Bearer {token.json()['token']}"}
    assert await _status(client, token_headers) == 200


async def test_a_user_cannot_see_or_revoke_another_users_session(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session)
    _, headers = await login_session(session, user)
    theirs, their_headers = await login_session(session, await create_user(session))

    listed = (await client.get("/auth/sessions", headers=headers)).json()
    assert str(theirs.id) not in [item["id"] for item in listed["items"]]
    assert_problem(await client.delete(f"/auth/sessions/{theirs.id}", headers=headers), 404)
    assert_problem(await client.delete(f"/auth/sessions/{uuid.uuid4()}", headers=headers), 404)
    assert await _status(client, their_headers) == 200
