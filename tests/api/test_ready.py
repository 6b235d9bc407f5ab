"""Readiness: 200 while PostgreSQL and Redis answer; 503 naming the part that does not, with
PostgreSQL really refusing connections and Redis really unreachable. Liveness never looks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.db import build_engine, build_sessionmaker
from app.main import create_app
from tests.storage.servers import free_port
from tests.worker.outage import cut_database, restore_database


@pytest.fixture
async def served(
    settings: Settings, arq_redis: ArqRedis, engine: AsyncEngine
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with an engine of its own (as `ibp serve` builds it), and the test's Redis."""
    app = create_app(settings)
    engine = build_engine(settings, pre_ping=False)
    app.state.sessionmaker = build_sessionmaker(engine)
    app.state.arq = arq_redis
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as client:
        client.app = app  # type: ignore[attr-defined]
        yield client
    await engine.dispose()


async def test_ready_when_postgresql_and_redis_answer(served: httpx.AsyncClient) -> None:
    answer = await served.get("/ready")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "ready", "checks": {"postgresql": "ok", "redis": "ok"}}


async def test_not_ready_while_postgresql_refuses_connections(
    served: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    assert (await served.get("/ready")).status_code == 200  # its pool holds a connection
    await cut_database()
    try:
        answer = await served.get("/ready")
        assert (await served.get("/health")).status_code == 200  # alive all the same
    finally:
        await restore_database()
        await engine.dispose()  # the session's pool held connections that were killed
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["retry-after"] == "5"
    body = answer.json()
    assert body["title"] == "Not ready"
    assert body["detail"].startswith("PostgreSQL is unreachable (")
    assert "Redis" not in body["detail"]
    assert body["checks"]["redis"] == "ok"
    assert body["checks"]["postgresql"].startswith("unreachable: ")
    assert "DBAPIError" not in body["detail"]  # the cause, not SQLAlchemy's wrapper
    # Back: ready again once the pool has let go of the killed connection.
    for _ in range(3):
        if (await served.get("/ready")).status_code == 200:
            break
    else:
        pytest.fail("still not ready after PostgreSQL came back")


async def test_not_ready_while_redis_is_unreachable(
    settings: Settings, served: httpx.AsyncClient
) -> None:
    port = free_port()  # nothing listens there
    unreachable = ArqRedis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1)
    served.app.state.arq = unreachable  # type: ignore[attr-defined]
    try:
        answer = await served.get("/ready")
    finally:
        await unreachable.aclose()
    assert answer.status_code == 503, answer.text
    body = answer.json()
    assert body["detail"] == "Redis is unreachable (ConnectionError)"
    assert body["checks"] == {"postgresql": "ok", "redis": "unreachable: ConnectionError"}
    assert str(port) not in answer.text and "127.0.0.1" not in answer.text


async def test_a_hung_backend_is_not_ready_within_the_probe_timeout(
    served: httpx.AsyncClient,
) -> None:
    """A Redis that accepts the connection and never answers (a blackholed host)."""
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    hung = ArqRedis.from_url(f"redis://127.0.0.1:{port}/0")
    served.app.state.arq = hung  # type: ignore[attr-defined]
    try:
        started = asyncio.get_running_loop().time()
        answer = await served.get("/ready")
        took = asyncio.get_running_loop().time() - started
    finally:
        await hung.aclose()
        silent.close()
    assert answer.status_code == 503
    assert answer.json()["detail"] == "Redis is unreachable (no answer within 2 s)"
    assert took < 4


async def test_the_api_starts_while_redis_is_down_and_says_so(settings: Settings) -> None:
    """`ibp serve` with Redis away: the API starts (no connection at startup), is alive, not
    ready, and a request that needs the queue is a 503 problem, not a 500."""
    app = create_app(
        settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    )
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as client,
    ):
        assert (await client.get("/health")).status_code == 200
        answer = await client.get("/ready")
        assert answer.status_code == 503, answer.text
        assert answer.json()["checks"]["redis"] == "unreachable: ConnectionError"
        assert answer.json()["checks"]["postgresql"] == "ok"
