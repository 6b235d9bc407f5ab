"""The webhook endpoints API: registration (secret shown once), ownership, admins' all-users
endpoints, disabling and enabling, the delivery log and the test event."""

from __future__ import annotations

import uuid

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import WebhookDelivery, WebhookEndpoint
from app.security import secret_box
from tests.api.helpers import admin_with_headers, assert_page, assert_problem, user_with_headers

URL = "http://127.0.0.1:9/hooks"


async def register(
    client: httpx.AsyncClient, headers: dict[str, str], **body: object
) -> dict[str, object]:
    response = await client.post(
        "/webhooks", json={"url": URL, "events": ["backup.completed"], **body}, headers=headers
    )
    assert response.status_code == 201, response.text
    created: dict[str, object] = response.json()
    return created


async def test_secret_is_shown_once_and_stored_encrypted(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    created = await register(
        client, headers, events=["backup.failed", "backup.failed", "policy.error"]
    )
    secret = str(created["secret"])
    assert secret.startswith("whsec_")
    assert created["owner_id"] == str(user.id)
    assert created["events"] == ["backup.failed", "policy.error"]
    assert created["enabled"] is True and created["all_users"] is False
    read = await client.get(f"/webhooks/{created['id']}", headers=headers)
    assert read.status_code == 200
    assert "secret" not in read.json() and secret not in read.text
    listed = await client.get("/webhooks", headers=headers)
    assert_page(listed.json(), total=1)
    assert secret not in listed.text
    row = await session.scalar(
        select(WebhookEndpoint).where(WebhookEndpoint.id == uuid.UUID(str(created["id"])))
    )
    assert row is not None and secret not in row.secret_encrypted
    assert secret_box().decrypt(row.secret_encrypted) == {"secret": secret}


async def test_users_only_see_their_own_webhooks_and_admins_see_all(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, alice = await user_with_headers(session)
    _, bob = await user_with_headers(session)
    _, admin = await admin_with_headers(session)
    hook = await register(client, alice)
    for method, path, body in (
        ("GET", f"/webhooks/{hook['id']}", None),
        ("PATCH", f"/webhooks/{hook['id']}", {"description": "mine now"}),
        ("DELETE", f"/webhooks/{hook['id']}", None),
        ("GET", f"/webhooks/{hook['id']}/deliveries", None),
        ("POST", f"/webhooks/{hook['id']}/test", None),
    ):
        assert_problem(await client.request(method, path, json=body, headers=bob), 404)
    assert_page((await client.get("/webhooks", headers=bob)).json(), total=0)
    assert (await client.get(f"/webhooks/{hook['id']}", headers=admin)).status_code == 200
    listed = (await client.get("/webhooks", headers=admin)).json()
    assert hook["id"] in [h["id"] for h in listed["items"]]


async def test_only_admins_receive_every_users_events(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, user = await user_with_headers(session)
    _, admin = await admin_with_headers(session)
    refused = await client.post(
        "/webhooks",
        json={"url": URL, "events": ["backup.failed"], "all_users": True},
        headers=user,
    )
    assert_problem(refused, 403)
    own = await register(client, user)
    assert_problem(
        await client.patch(f"/webhooks/{own['id']}", json={"all_users": True}, headers=user), 403
    )
    everyone = await register(client, admin, all_users=True)
    assert everyone["all_users"] is True


async def test_disabling_fails_pending_deliveries_and_enabling_clears_the_reason(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    hook = await register(client, headers)
    test = await client.post(f"/webhooks/{hook['id']}/test", headers=headers)
    assert test.status_code == 202, test.text
    assert test.json()["event_type"] == "webhook.test"
    assert test.json()["status"] == "pending"
    off = await client.patch(f"/webhooks/{hook['id']}", json={"enabled": False}, headers=headers)
    assert off.status_code == 200
    assert off.json()["enabled"] is False
    assert off.json()["disabled_reason"]
    assert off.json()["disabled_at"]
    assert_problem(await client.post(f"/webhooks/{hook['id']}/test", headers=headers), 409)
    log = (await client.get(f"/webhooks/{hook['id']}/deliveries", headers=headers)).json()
    assert [(d["status"], d["last_error"]) for d in log["items"]] == [
        ("failed", "The endpoint was disabled before this delivery succeeded")
    ]
    on = await client.patch(f"/webhooks/{hook['id']}", json={"enabled": True}, headers=headers)
    assert on.json()["enabled"] is True
    assert on.json()["disabled_reason"] is None and on.json()["disabled_at"] is None


async def test_deleting_a_webhook_deletes_its_delivery_log(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    hook = await register(client, headers)
    await client.post(f"/webhooks/{hook['id']}/test", headers=headers)
    deleted = await client.delete(f"/webhooks/{hook['id']}", headers=headers)
    assert deleted.status_code == 204
    assert_problem(await client.get(f"/webhooks/{hook['id']}", headers=headers), 404)
    left = await session.scalar(
        select(WebhookDelivery.id).where(WebhookDelivery.endpoint_id == uuid.UUID(str(hook["id"])))
    )
    assert left is None


async def test_bad_bodies_are_422(client: httpx.AsyncClient, session: AsyncSession) -> None:
    _, headers = await user_with_headers(session)
    for body, field in (
        ({"url": URL, "events": []}, "events"),
        ({"url": URL, "events": ["backup.exploded"]}, "events"),
        ({"url": URL, "events": ["webhook.test"]}, "events"),
        ({"url": "ftp://example.com/x", "events": ["backup.failed"]}, "url"),
        ({"url": "not a url", "events": ["backup.failed"]}, "url"),
        ({"url": URL, "events": ["backup.failed"], "secret": "whsec_mine"}, "secret"),
    ):
        response = await client.post("/webhooks", json=body, headers=headers)
        assert_problem(response, 422, field=field)
