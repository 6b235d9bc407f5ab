"""Request bodies over IBP_MAX_BODY_BYTES are refused with a 413 problem while they arrive,
with or without a Content-Length, and no more of them is read than the limit."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from arq.connections import ArqRedis
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.config import Settings
from app.main import create_app
from tests.api.helpers import Upload, assert_problem
from tests.api.live import serve

LIMIT = 4096
CHUNK = 1024


@pytest.fixture
async def small(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], arq_redis: ArqRedis
) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(settings.model_copy(update={"max_body_bytes": LIMIT}))
    app.state.sessionmaker = sessionmaker
    app.state.arq = arq_redis
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as c:
        yield c


def _login_json(size: int) -> bytes:
    body = b'{"email": "a@example.com", "password": "x"}'
    return body + b" " * (size - len(body))


async def test_a_declared_length_over_the_limit_is_refused_before_reading(
    small: httpx.AsyncClient,
) -> None:
    upload = Upload(LIMIT * 4)
    response = await small.post(
        "/auth/login",
        content=upload,
        headers={"Content-Length": str(LIMIT * 4), "Content-Type": "application/json"},
    )
    assert_problem(response, 413)
    assert upload.sent == 0


async def test_a_chunked_body_over_the_limit_is_refused_once_it_passes_it(
    small: httpx.AsyncClient,
) -> None:
    upload = Upload(LIMIT * 16)
    response = await small.post(
        "/auth/login", content=upload, headers={"Content-Type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_problem(response, 413)
    assert upload.sent <= LIMIT + CHUNK


async def test_a_body_at_the_limit_is_read_as_usual(small: httpx.AsyncClient) -> None:
    response = await small.post(
        "/auth/login",
        content=_login_json(LIMIT),
        headers={"Content-Type": "application/json"},
    )
    assert_problem(response, 401)
    too_big = await small.post(
        "/auth/login",
        content=_login_json(LIMIT + 1),
        headers={"Content-Type": "application/json"},
    )
    assert_problem(too_big, 413)


def test_the_default_limit_is_one_mebibyte() -> None:
    assert Settings().max_body_bytes == 1024 * 1024


async def test_a_real_server_refuses_a_chunked_upload_over_the_limit(
    settings: Settings, engine: AsyncEngine
) -> None:
    app = create_app(settings.model_copy(update={"max_body_bytes": LIMIT}))
    with serve(app) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            upload = Upload(LIMIT * 16)
            response = await client.post(
                "/auth/login", content=upload, headers={"Content-Type": "application/json"}
            )
            assert_problem(response, 413)
            assert response.request.headers["transfer-encoding"] == "chunked"
            health = await client.get("/health")
            assert health.status_code == 200
