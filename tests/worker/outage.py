"""A real PostgreSQL outage of the test database: connections refused and killed."""

from __future__ import annotations

import asyncpg

from tests.conftest import PG_ADMIN_DSN, TEST_DB


async def cut_database() -> None:
    """From now on the test database refuses connections, and every open one is killed."""
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'ALTER DATABASE "{TEST_DB}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", TEST_DB
        )
    finally:
        await admin.close()


async def restore_database() -> None:
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'ALTER DATABASE "{TEST_DB}" ALLOW_CONNECTIONS true')
    finally:
        await admin.close()


async def read(query: str, *args: object) -> object:
    """One value, on a connection of its own (the test's pool may hold killed ones)."""
    dsn = PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{TEST_DB}"
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()
