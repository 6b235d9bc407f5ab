"""/me self-service and admin-only /users management, plus the idempotent first admin."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.models import User
from app.paths import ALEMBIC_INI
from app.security import verify_password
from app.users.service import ensure_admin
from tests.api.helpers import admin_with_headers, assert_page, assert_problem, user_with_headers
from tests.factories import PASSWORD, create_instance, create_policy


async def test_me_returns_own_profile(client: httpx.AsyncClient, session: AsyncSession) -> None:
    user, headers = await user_with_headers(session, timezone="Europe/Berlin", name="Ann")
    response = await client.get("/me", headers=headers)
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == str(user.id)
    assert body["email"] == user.email
    assert body["name"] == "Ann"
    assert body["role"] == "user"
    assert body["timezone"] == "Europe/Berlin"
    assert "password" not in response.text and "password_hash" not in body


async def test_me_patch_changes_name_and_timezone(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    response = await client.patch(
        "/me", json={"name": "New Name", "timezone": "Asia/Tokyo"}, headers=headers
    )
    assert response.status_code == 200, response.text
    assert response.json()["name"] == "New Name"
    assert response.json()["timezone"] == "Asia/Tokyo"
    again = (await client.get("/me", headers=headers)).json()
    assert again["timezone"] == "Asia/Tokyo"


async def test_me_patch_rejects_non_iana_timezone_naming_the_field(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    for zone in ("Mars/Olympus", "GMT+5", "", "europe/berlin"):
        response = await client.patch("/me", json={"timezone": zone}, headers=headers)
        assert_problem(response, 422, field="timezone")


async def test_me_patch_cannot_change_role(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    response = await client.patch("/me", json={"role": "admin"}, headers=headers)
    assert response.status_code in (200, 422)
    assert (await client.get("/me", headers=headers)).json()["role"] == "user"


async def test_changing_timezone_replans_next_run_at_to_local_hour_in_new_zone(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session, timezone="UTC")
    policy = await create_policy(session, user, hour=2)
    weekly = await create_policy(session, user, frequency="weekly", day_of_week="monday", hour=15)
    assert policy.next_run_at is not None
    assert policy.next_run_at.astimezone(UTC).hour == 2
    response = await client.patch("/me", json={"timezone": "Asia/Kolkata"}, headers=headers)
    assert response.status_code == 200, response.text
    now = datetime.now(UTC)
    for policy_id, hour in ((policy.id, 2), (weekly.id, 15)):
        read = (await client.get(f"/backup-policies/{policy_id}", headers=headers)).json()
        assert read["timezone"] == "Asia/Kolkata"
        next_run = datetime.fromisoformat(read["next_run_at"])
        local = next_run.astimezone(ZoneInfo("Asia/Kolkata"))
        assert (local.hour, local.minute) == (hour, 0)
        # Kolkata is UTC+5:30, so the UTC instant is on the half hour.
        assert next_run.astimezone(UTC).minute == 30
        assert now < next_run <= now + timedelta(days=1)


async def test_admin_changing_a_users_timezone_also_replans(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, admin_headers = await admin_with_headers(session)
    user = (await user_with_headers(session, timezone="UTC"))[0]
    policy = await create_policy(session, user, hour=9)
    response = await client.patch(
        f"/users/{user.id}", json={"timezone": "America/Los_Angeles"}, headers=admin_headers
    )
    assert response.status_code == 200, response.text
    await session.refresh(policy)
    assert policy.next_run_at is not None
    local = policy.next_run_at.astimezone(ZoneInfo("America/Los_Angeles"))
    assert (local.hour, local.minute) == (9, 0)


# --- /users (admin) ---------------------------------------------------------------------------


async def test_admin_creates_reads_updates_and_deletes_a_user(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    created = await client.post(
        "/users",
        json={"email": "New.User@Example.com", "password": "long enough pw", "name": "N"},
        headers=headers,
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["email"] == "new.user@example.com"
    assert body["role"] == "user"
    assert body["timezone"] == "UTC"
    user_id = body["id"]

    login = await client.post(
        "/auth/login", json={"email": "new.user@example.com", "password": "long enough pw"}
    )
    assert login.status_code == 200

    read = await client.get(f"/users/{user_id}", headers=headers)
    assert read.status_code == 200 and read.json()["email"] == "new.user@example.com"

    patched = await client.patch(
        f"/users/{user_id}", json={"role": "admin", "name": "Boss"}, headers=headers
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["role"] == "admin" and patched.json()["name"] == "Boss"

    listed = await client.get("/users", headers=headers)
    assert listed.status_code == 200
    assert user_id in [u["id"] for u in listed.json()["items"]]

    deleted = await client.delete(f"/users/{user_id}", headers=headers)
    assert deleted.status_code == 204
    assert_problem(await client.get(f"/users/{user_id}", headers=headers), 404)


async def test_users_list_is_paginated(client: httpx.AsyncClient, session: AsyncSession) -> None:
    _, headers = await admin_with_headers(session)
    for _ in range(3):
        await user_with_headers(session)
    total = await session.scalar(select(func.count()).select_from(User))
    response = await client.get("/users", params={"limit": 2, "offset": 1}, headers=headers)
    assert response.status_code == 200
    assert_page(response.json(), total=int(total or 0), limit=2, offset=1)
    assert len(response.json()["items"]) == 2


async def test_creating_a_user_with_a_taken_email_is_409(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    existing, _ = await user_with_headers(session)
    response = await client.post(
        "/users",
        json={"email": existing.email.upper(), "password": "long enough pw"},
        headers=headers,
    )
    assert_problem(response, 409)


async def test_changing_email_to_a_taken_one_is_409(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    a, _ = await user_with_headers(session)
    b, _ = await user_with_headers(session)
    response = await client.patch(f"/users/{b.id}", json={"email": a.email}, headers=headers)
    assert_problem(response, 409)


async def test_user_create_validates_fields(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    bad = [
        ({"email": "not-an-email", "password": "long enough pw"}, "email"),
        ({"email": "a@example.com", "password": "short"}, "password"),
        ({"email": "a@example.com", "password": "long enough pw", "role": "root"}, "role"),
        ({"email": "a@example.com", "password": "long enough pw", "timezone": "X/Y"}, "timezone"),
    ]
    for payload, field in bad:
        assert_problem(await client.post("/users", json=payload, headers=headers), 422, field=field)


async def test_users_endpoints_are_403_for_users(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    assert_problem(await client.get("/users", headers=headers), 403)
    assert_problem(await client.get(f"/users/{user.id}", headers=headers), 403)
    assert_problem(
        await client.post(
            "/users", json={"email": "x@example.com", "password": "long enough pw"}, headers=headers
        ),
        403,
    )
    assert_problem(
        await client.patch(f"/users/{user.id}", json={"role": "admin"}, headers=headers), 403
    )
    assert_problem(await client.delete(f"/users/{user.id}", headers=headers), 403)


async def test_admin_cannot_delete_self(client: httpx.AsyncClient, session: AsyncSession) -> None:
    admin, headers = await admin_with_headers(session)
    assert_problem(await client.delete(f"/users/{admin.id}", headers=headers), 409)


async def test_deleting_a_user_who_owns_rows_is_409(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    user, _ = await user_with_headers(session)
    await create_instance(session, user)
    body = assert_problem(await client.delete(f"/users/{user.id}", headers=headers), 409)
    assert "instance" in body["detail"]


async def test_unknown_user_is_404(client: httpx.AsyncClient, session: AsyncSession) -> None:
    _, headers = await admin_with_headers(session)
    assert_problem(await client.get(f"/users/{uuid.uuid4()}", headers=headers), 404)


# --- create-admin -----------------------------------------------------------------------------


async def test_ensure_admin_is_idempotent(session: AsyncSession) -> None:
    user, created = await ensure_admin(session, " Root@Example.com ", "first password")
    assert created is True
    assert user.email == "root@example.com" and user.role == "admin"
    again, created_again = await ensure_admin(session, "root@example.com", "second password")
    assert created_again is False
    assert again.id == user.id
    assert verify_password("second password", again.password_hash)
    count = await session.scalar(
        select(func.count()).select_from(User).where(User.email == "root@example.com")
    )
    assert count == 1


async def test_ensure_admin_promotes_an_existing_user(session: AsyncSession) -> None:
    user, _ = await user_with_headers(session)
    promoted, created = await ensure_admin(session, user.email, PASSWORD)
    assert created is False
    assert promoted.id == user.id and promoted.role == "admin"


async def test_create_admin_cli_is_idempotent(committed_engine: AsyncEngine) -> None:
    env = {**os.environ, "IBP_ADMIN_PASSWORD": "cli password 1"}
    args = [sys.executable, "-m", "app.cli", "create-admin", "--email", "cli-admin@example.com"]
    cwd = str(ALEMBIC_INI.parent)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)

    first = await asyncio.to_thread(run)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("Created admin cli-admin@example.com")
    second = await asyncio.to_thread(run)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("Updated admin cli-admin@example.com")
    async with committed_engine.connect() as conn:
        rows = (
            await conn.execute(select(User.role).where(User.email == "cli-admin@example.com"))
        ).all()
    assert [r[0] for r in rows] == ["admin"]
