from __future__ import annotations

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from tests.factories import PASSWORD, auth_headers, create_user


async def test_login_then_me(client: httpx.AsyncClient, session: AsyncSession) -> None:
    user = await create_user(session, timezone="Europe/Berlin")
    response = await client.post("/auth/login", json={"email": user.email, "password": PASSWORD})
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    me = await client.get("/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200
    assert me.json()["timezone"] == "Europe/Berlin"


async def test_policy_create_and_list(client: httpx.AsyncClient, session: AsyncSession) -> None:
    user = await create_user(session, timezone="America/New_York")
    headers = await auth_headers(session, user)
    body = {"name": "Daily prod", "schedule": {"frequency": "daily", "hour": 2}}
    created = await client.post("/backup-policies", json=body, headers=headers)
    assert created.status_code == 201, created.text
    assert created.json()["schedule_summary"] == "Daily at 2:00 AM"
    listed = await client.get("/backup-policies", headers=headers)
    assert listed.json()["total"] == 1
