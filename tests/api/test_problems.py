"""Error rendering: every failure is an RFC 9457 problem, and bad input is a 422, not a 500."""

from __future__ import annotations

import socket

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.main import create_app
from tests.api.helpers import admin_with_headers, assert_problem, user_with_headers


@pytest.mark.parametrize(
    ("method", "url", "body", "field"),
    [
        ("POST", "/auth/login", {"email": "a\x00b@example.com", "password": "x"}, "email"),
        ("POST", "/tokens", {"name": "a\x00b"}, "name"),
        ("PATCH", "/me", {"name": "a\x00b"}, "name"),
        (
            "POST",
            "/backup-policies",
            {"name": "a\x00", "schedule": {"frequency": "daily", "hour": 1}},
            "name",
        ),
        ("POST", "/locations", {"name": "a\x00b"}, "name"),
        (
            "POST",
            "/backup-storages",
            {"name": "s", "kind": "nfs", "config": {"path": "/a", "server": "x\x00"}},
            "config.server",
        ),
    ],
)
async def test_nul_characters_in_text_are_422_naming_the_field(
    client: httpx.AsyncClient,
    session: AsyncSession,
    method: str,
    url: str,
    body: dict[str, object],
    field: str,
) -> None:
    _, headers = await admin_with_headers(session)
    response = await client.request(method, url, json=body, headers=headers)
    problem = assert_problem(response, 422)
    assert [e["field"] for e in problem["errors"]] == [field], problem
    assert "NUL" in problem["errors"][0]["message"]


async def test_token_expiry_beyond_the_database_range_is_422(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    response = await client.post(
        "/tokens",
        json={"name": "forever", "expires_at": "9999-12-31T23:59:59-12:00"},
        headers=headers,
    )
    assert_problem(response, 422, field="expires_at")


@pytest.mark.parametrize("content", [b"\xbd[\xc3", b"{not json", b""])
async def test_unparsable_body_is_422_problem(
    client: httpx.AsyncClient, session: AsyncSession, content: bytes
) -> None:
    _, headers = await user_with_headers(session)
    response = await client.patch(
        "/me", content=content, headers={**headers, "Content-Type": "application/json"}
    )
    if content == b"":
        assert response.status_code in (200, 422)
        return
    assert_problem(response, 422, field="body")


async def test_unknown_path_is_404_problem(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/no-such-thing"), 404)


async def test_wrong_method_is_405_problem(client: httpx.AsyncClient) -> None:
    assert_problem(await client.put("/me"), 405)


async def test_malformed_uuid_in_path_is_422_naming_it(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    response = await client.get("/backup-policies/not-a-uuid", headers=headers)
    assert_problem(response, 422, field="policy_id")


@pytest.mark.parametrize(
    ("method", "url", "body", "field"),
    [
        ("patch", "/me", {"role": "admin"}, "role"),
        (
            "post",
            "/backup-policies",
            {"name": "x", "schedule": {"frequency": "daily", "hour": 2}, "retention": 3},
            "retention",
        ),
        (
            "post",
            "/backup-policies",
            {"name": "x", "schedule": {"frequency": "daily", "hour": 2, "minute": 30}},
            "schedule.minute",
        ),
    ],
)
async def test_unknown_fields_are_422_not_silently_ignored(
    client: httpx.AsyncClient,
    session: AsyncSession,
    method: str,
    url: str,
    body: dict,
    field: str,  # type: ignore[type-arg]
) -> None:
    _, headers = await user_with_headers(session)
    response = await getattr(client, method)(url, json=body, headers=headers)
    assert_problem(response, 422, field=field)
    me = await client.get("/me", headers=headers)
    assert me.json()["role"] == "user"


async def test_an_unreachable_database_is_a_503_problem(
    settings: Settings,
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = settings.model_copy(
        update={"database_url": f"postgresql+asyncpg://postgres@127.0.0.1:{port}/ibp"}
    )
    app = create_app(down)
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": "Bearer ibpt_whatever"}
    async with (
        app.router.lifespan_context(app),  # starts without the database: it connects lazily
        httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as client,
    ):
        for path in ("/backup-policies", "/instances", "/me"):
            response = await client.get(path, headers=headers)
            assert_problem(response, 503)
            assert response.headers["retry-after"] == "5"
            assert "cannot reach its database" in response.json()["detail"]


async def test_an_unexpected_error_is_a_500_problem_without_internals(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/api/v1/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as client:
        response = await client.get("/boom")
    assert_problem(response, 500)
    assert "secret" not in response.text
