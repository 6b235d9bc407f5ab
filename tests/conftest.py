"""Shared fixtures: a real PostgreSQL built by Alembic, a real Redis, the app over ASGI.

Each test runs inside a transaction that is rolled back; the app's sessions join it through
savepoints, so a request's commit is real to the app and invisible to the next test.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

# One database per test run, so parallel runs on one machine never drop each other's.
TEST_DB = os.environ.get("IBP_TEST_DATABASE", f"ibp_test_{os.getpid()}")
PG_ADMIN_DSN = os.environ.get("IBP_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
os.environ.setdefault("IBP_ENVIRONMENT", "test")
os.environ.setdefault("IBP_SECRET_KEY", "test-secret-key-that-is-long-enough-for-the-check")
os.environ["IBP_DATABASE_URL"] = (
    PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + f"/{TEST_DB}"
)
os.environ.setdefault("IBP_REDIS_URL", "redis://127.0.0.1:6379/15")
# Where the API tests' local and NFS storages may lie (the default is the data dir's backups).
os.environ.setdefault("IBP_STORAGE_ROOTS", '["/srv/backups", "/mnt/nfs"]')
# Every test client logs in from one address; the throttle's own tests lower the limits.
os.environ.setdefault("IBP_LOGIN_ATTEMPTS_PER_ADDRESS", "1000000")
# Webhook tests send to a receiver on loopback.
os.environ.setdefault("IBP_WEBHOOKS_ALLOW_PRIVATE", "true")

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import pytest  # noqa: E402
from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from arq import create_pool  # noqa: E402
from arq.connections import ArqRedis, RedisSettings  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.ext.asyncio import (  # noqa: E402
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.config import Settings, get_settings  # noqa: E402
from app.main import create_app  # noqa: E402
from app.models import Base  # noqa: E402
from app.paths import ALEMBIC_INI  # noqa: E402


async def _drop_database(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", TEST_DB
    )
    await conn.execute(f'DROP DATABASE IF EXISTS "{TEST_DB}"')


async def _recreate_database() -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await _drop_database(conn)
        await conn.execute(f'CREATE DATABASE "{TEST_DB}"')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    await _recreate_database()
    cfg = Config(str(ALEMBIC_INI))
    cfg.attributes["configure_logger"] = False
    await asyncio.to_thread(command.upgrade, cfg, "head")
    engine = create_async_engine(settings.database_url, pool_size=10)
    yield engine
    await engine.dispose()
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await _drop_database(conn)
    finally:
        await conn.close()


@pytest.fixture
async def connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    async with engine.connect() as conn:
        outer = await conn.begin()
        yield conn
        if outer.is_active:
            await outer.rollback()


@pytest.fixture
def sessionmaker(connection: AsyncConnection) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(
        bind=connection,
        expire_on_commit=False,
        autoflush=False,
        join_transaction_mode="create_savepoint",
    )


@pytest.fixture
async def session(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    async with sessionmaker() as s:
        yield s


@pytest.fixture
async def committed_engine(engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    """For tests that need real concurrent transactions: every table is emptied afterwards."""
    yield engine
    names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {names} CASCADE"))


@pytest.fixture(scope="session")
async def arq_redis(settings: Settings) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    await pool.flushdb()
    yield pool
    await pool.aclose()


@pytest.fixture
async def app(
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    arq_redis: ArqRedis,
) -> FastAPI:
    application = create_app(settings)
    application.state.sessionmaker = sessionmaker
    application.state.arq = arq_redis
    return application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as c:
        yield c
