"""Where webhooks may go: http(s) only; loopback, private, link-local and multicast addresses
refused unless IBP_WEBHOOKS_ALLOW_PRIVATE (the other tests enable it), at registration and again
before every attempt."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.engine.webhooks.delivery import DeliverySettings, deliver_due
from app.engine.webhooks.events import emit_event
from app.engine.webhooks.urls import UrlRefused, pinned, refusal, resolve
from tests.api.helpers import assert_problem, user_with_headers
from tests.factories import create_user, create_webhook
from tests.webhooks.receiver import Receiver, localhost_certificate, running_receiver

REFUSED = [
    "http://127.0.0.1/hook",
    "http://127.1.2.3:8080/hook",
    "http://localhost/hook",
    "http://10.0.0.5/hook",
    "http://172.16.0.1/hook",
    "http://192.168.1.1/hook",
    "http://100.64.0.1/hook",  # carrier-grade NAT
    "http://169.254.169.254/latest/meta-data",  # cloud metadata
    "http://[::1]/hook",
    "http://[fe80::1]/hook",
    "http://[fc00::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://224.0.0.1/hook",
    "http://0.0.0.0/hook",
]


@pytest.fixture
def private_refused(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "webhooks_allow_private", False)


@pytest.mark.usefixtures("private_refused")
async def test_private_addresses_are_refused_at_registration(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    for url in REFUSED:
        response = await client.post(
            "/webhooks", json={"url": url, "events": ["backup.failed"]}, headers=headers
        )
        body = assert_problem(response, 422, field="url")
        assert "IBP_WEBHOOKS_ALLOW_PRIVATE" in body["detail"], url
    hook = await client.post(
        "/webhooks",
        json={"url": "http://93.184.215.14/hook", "events": ["backup.failed"]},
        headers=headers,
    )
    assert hook.status_code == 201, hook.text
    moved = await client.patch(
        f"/webhooks/{hook.json()['id']}", json={"url": "http://10.1.1.1/"}, headers=headers
    )
    assert_problem(moved, 422, field="url")


async def test_only_http_and_https_urls_are_accepted(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    for url in (
        "ftp://example.com/",
        "file:///etc/passwd",
        "gopher://example.com/",
        "http:///nohost",
        "http://example.com:99999/",
        "http://127.0.0.1/#fragment",
        "javascript:alert(1)",
    ):
        response = await client.post(
            "/webhooks", json={"url": url, "events": ["backup.failed"]}, headers=headers
        )
        assert_problem(response, 422, field="url")


def test_public_addresses_pass_and_others_are_named() -> None:
    assert refusal(ipaddress.ip_address("93.184.215.14")) is None
    assert refusal(ipaddress.ip_address("2606:4700::1111")) is None
    assert refusal(ipaddress.ip_address("127.0.0.1")) == "loopback"
    assert refusal(ipaddress.ip_address("10.0.0.1")) == "private"
    assert refusal(ipaddress.ip_address("fe80::1")) == "link-local"
    assert refusal(ipaddress.ip_address("239.1.1.1")) == "multicast"
    assert refusal(ipaddress.ip_address("::ffff:192.168.0.1")) == "private"


async def test_a_name_is_checked_against_every_address_it_resolves_to() -> None:
    with pytest.raises(UrlRefused, match="loopback"):
        await resolve("http://localhost:8080/x", allow_private=False)
    target = await resolve("https://localhost:8443/x?y=1", allow_private=True)
    assert target.host == "localhost" and target.port == 8443
    assert all(a.is_loopback for a in target.addresses)
    url, extensions = pinned(target, target.addresses[0])
    assert "localhost" not in url and url.endswith(":8443/x?y=1")
    assert extensions == {"sni_hostname": "localhost"}


async def test_delivery_checks_the_url_again_and_connects_to_the_checked_address(
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
    receiver: Receiver,
) -> None:
    owner = await create_user(session)
    port = receiver.base_url.rsplit(":", 1)[1]
    endpoint = await create_webhook(session, owner, url=f"http://localhost:{port}/named")
    await emit_event(session, "backup.failed", owner.id, {})
    await session.commit()

    # Registered while private addresses were allowed; no longer: the attempt fails, unsent.
    refused = DeliverySettings(retry_schedule=(), allow_private=False)
    assert (await deliver_due(sessionmaker, refused)).failed == 1
    assert receiver.requests == []
    await session.refresh(endpoint)
    assert endpoint.enabled is False
    assert "URL refused: localhost resolves to a loopback address" in (
        endpoint.disabled_reason or ""
    )

    # Allowed: sent to the address checked, with the name in the Host header.
    endpoint.enabled, endpoint.disabled_at, endpoint.disabled_reason = True, None, None
    await session.flush()
    await emit_event(session, "backup.failed", owner.id, {})
    await session.commit()
    allowed = DeliverySettings(retry_schedule=(), allow_private=True)
    assert (await deliver_due(sessionmaker, allowed)).succeeded == 1
    [request] = receiver.requests
    assert request.path == "/named"
    assert request.headers["host"] == f"localhost:{port}"


async def test_https_to_a_checked_address_still_verifies_the_certificate_for_the_name(
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
    tmp_path: Path,
) -> None:
    server_context, pem = localhost_certificate(tmp_path)
    settings = DeliverySettings(retry_schedule=(), allow_private=True)
    trusting = httpx.AsyncClient(
        verify=ssl.create_default_context(cadata=pem), follow_redirects=False, trust_env=False
    )
    owner = await create_user(session)
    with running_receiver(server_context) as receiver:
        port = receiver.base_url.rsplit(":", 1)[1]
        by_name = await create_webhook(session, owner, url=f"https://localhost:{port}/tls")
        await emit_event(session, "backup.failed", owner.id, {})
        await session.commit()
        async with trusting:
            assert (await deliver_due(sessionmaker, settings, trusting)).succeeded == 1
            assert receiver.sni == ["localhost"]  # connected to the address, asked for the name
            assert [r.path for r in receiver.requests] == ["/tls"]

            # The certificate names localhost, not 127.0.0.1: by address it is refused.
            by_name.enabled = False
            by_name.disabled_at = by_name.created_at
            by_ip = await create_webhook(session, owner, url=f"https://127.0.0.1:{port}/ip")
            await emit_event(session, "backup.failed", owner.id, {})
            await session.commit()
            run = await deliver_due(sessionmaker, settings, trusting)
            assert (run.attempted, run.succeeded) == (1, 0)
            await session.refresh(by_ip)
            assert "certificate" in (by_ip.disabled_reason or "").lower()
    assert [r.path for r in receiver.requests] == ["/tls"]
