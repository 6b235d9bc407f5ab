"""Restore tests reuse the worker fixtures (a real VM, local storage, committed sessions) and
add a real S3 server (``rclone serve s3``) and an API client over committed sessions."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.main import create_app
from tests.storage import servers
from tests.storage.servers import Server
from tests.worker.conftest import (  # noqa: F401  (fixtures shared with the worker tests)
    World,
    libvirtd,
    make_vm,
    make_world,
    real_sessionmaker,
    worker_ctx,
    world,
)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[Server]:
    try:
        server = servers.start_rclone_s3()
    except servers.ServerStartError as exc:
        pytest.fail(f"cannot start rclone serve s3: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def real_client(
    settings: Settings,
    real_sessionmaker: async_sessionmaker[AsyncSession],  # noqa: F811
    arq_redis: ArqRedis,
) -> AsyncIterator[httpx.AsyncClient]:
    """The API over committed transactions, so jobs run by the test see what it wrote."""
    app = create_app(settings)
    app.state.sessionmaker = real_sessionmaker
    app.state.arq = arq_redis
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as c:
        yield c
