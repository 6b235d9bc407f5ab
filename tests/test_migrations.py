"""Migrations build exactly the models' schema, and go down and up again cleanly."""

from __future__ import annotations

import asyncio
import os

import asyncpg
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from app.models import Base
from app.paths import ALEMBIC_INI
from tests.conftest import PG_ADMIN_DSN

DB = f"ibp_migrations_{os.getpid()}"


async def _sql(statement: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def test_migrations_match_the_models_and_are_reversible() -> None:
    url = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    url += f"/{DB}"
    await _sql(f'DROP DATABASE IF EXISTS "{DB}"')
    await _sql(f'CREATE DATABASE "{DB}"')
    cfg = Config(str(ALEMBIC_INI))
    cfg.attributes["configure_logger"] = False
    cfg.attributes["database_url"] = url
    engine = create_async_engine(url)
    try:
        await asyncio.to_thread(command.upgrade, cfg, "head")
        await asyncio.to_thread(command.downgrade, cfg, "base")
        await asyncio.to_thread(command.upgrade, cfg, "head")
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata
                )
            )
        assert diff == [], f"models and migrations differ: {diff}"
        async with engine.connect() as conn:  # 0006 dropped the read cache's notifications
            leftovers = await conn.scalar(
                text(
                    "SELECT (SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal)"
                    " + (SELECT count(*) FROM pg_proc WHERE proname LIKE 'ibp_notify%')"
                )
            )
        assert leftovers == 0
    finally:
        await engine.dispose()
        await _sql(f'DROP DATABASE IF EXISTS "{DB}"')
