"""Scheduler tick benchmark: one tick over 100,000 attached instances in 10,000 policies with
1% due, against a tick over 1,000 instances where the same number (1,000) is due.

The tick's cost should grow with the due runs, not with the policies in the database.
Run by hand:  .venv/bin/python bench/tick_bench.py
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from arq import create_pool
from arq.connections import RedisSettings
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.db import build_sessionmaker
from worker.tasks.tick import run_tick

ROOT = Path(__file__).resolve().parent.parent
PG = os.environ.get("IBP_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
REDIS = os.environ.get("IBP_BENCH_REDIS", "redis://127.0.0.1:6379/14")


async def seed(db: str, policies: int, per_policy: int, due_policies: int) -> None:
    conn = await asyncpg.connect(f"{PG}/postgres")
    await conn.execute(f'DROP DATABASE IF EXISTS "{db}"')
    await conn.execute(f'CREATE DATABASE "{db}"')
    await conn.close()
    env = {**os.environ, "IBP_DATABASE_URL": _url(db)}
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    conn = await asyncpg.connect(f"{PG}/{db}")
    await conn.execute(
        """INSERT INTO users (id, email, name, password_hash, role, timezone)
           SELECT gen_random_uuid(), 'u' || g || '@b', '', 'x', 'user',
                  'UTC'
           FROM generate_series(1, 1000) g"""
    )
    await conn.execute("INSERT INTO locations (id, name) VALUES (gen_random_uuid(), 'b')")
    await conn.execute(
        """INSERT INTO hypervisors (id, name, location_id, libvirt_uri, max_concurrent_backups,
                                    scratch_dir)
           SELECT gen_random_uuid(), 'hv' || g, (SELECT id FROM locations), 'qemu:///system', 2,
                  '/var/tmp' FROM generate_series(1, 50) g"""
    )
    await conn.execute(
        """WITH o AS (SELECT id, row_number() OVER (ORDER BY id) n FROM users)
           INSERT INTO backup_policies (id, owner_id, name, frequency, hour, day_of_week,
               max_incremental_chain, retention_count, backup_device, status, next_run_at,
               skipped_runs)
           SELECT gen_random_uuid(), o.id, 'p' || g, 'daily', 0, NULL, 6, 3, 'primary',
                  'active', now() + interval '1 day', 0
           FROM generate_series(1, $1) g JOIN o ON o.n = 1 + g % 1000""",
        policies,
    )
    await conn.execute(
        """WITH p AS (SELECT id, owner_id, row_number() OVER (ORDER BY id) n FROM backup_policies),
                h AS (SELECT id, row_number() OVER (ORDER BY id) n FROM hypervisors)
           INSERT INTO instances (id, name, owner_id, hypervisor_id, domain_name, status,
                                  backup_policy_id)
           SELECT gen_random_uuid(), 'vm' || g, p.owner_id, h.id, 'd' || g, 'deployed', p.id
           FROM generate_series(1, $1) g JOIN p ON p.n = 1 + g % $2 JOIN h ON h.n = 1 + g % 50""",
        policies * per_policy,
        policies,
    )
    await conn.execute("ANALYZE")
    await conn.close()


def _url(db: str) -> str:
    return f"{PG.replace('postgresql://', 'postgresql+asyncpg://')}/{db}"


async def one_tick(db: str, due_policies: int, engine: AsyncEngine) -> tuple[float, int]:
    conn = await asyncpg.connect(f"{PG}/{db}")
    await conn.execute("DELETE FROM backups")
    # The due policies' slot is this hour (UTC owners), so the tick runs them, not skips them.
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    await conn.execute("UPDATE backup_policies SET hour = $1", now.hour)
    await conn.execute(
        "UPDATE backup_policies SET next_run_at = $1::timestamptz + interval '1 day'",
        now,
    )
    await conn.execute(
        """UPDATE backup_policies SET next_run_at = $1::timestamptz
           WHERE id IN (SELECT id FROM backup_policies ORDER BY id LIMIT $2)""",
        now,
        due_policies,
    )
    await conn.execute("VACUUM ANALYZE backups")
    await conn.close()
    redis = await create_pool(RedisSettings.from_dsn(REDIS))
    await redis.flushdb()
    try:
        maker = build_sessionmaker(engine)
        async with maker() as s:  # warm the pool and the statement cache
            await s.connection()
        started = time.perf_counter()
        result = await run_tick(maker, redis, now, timedelta(hours=6))
        elapsed = time.perf_counter() - started
    finally:
        await redis.flushdb()
        await redis.aclose()
    return elapsed, len(result.dispatched)


async def main() -> None:
    big, small = "ibp_bench_tick_big", "ibp_bench_tick_small"
    await seed(big, policies=10_000, per_policy=10, due_policies=100)
    await seed(small, policies=100, per_policy=10, due_policies=100)
    times: dict[str, list[float]] = {big: [], small: []}
    # A worker keeps its engine (and SQLAlchemy's compiled-statement cache): so does the bench.
    engines = {db: create_async_engine(_url(db), pool_size=5) for db in (big, small)}
    for db in (big, small):
        await one_tick(db, 100, engines[db])  # warm-up, not measured
    for _ in range(5):  # alternate, so machine noise hits both alike
        for db in (big, small):
            elapsed, dispatched = await one_tick(db, 100, engines[db])
            assert dispatched == 1000, dispatched
            times[db].append(elapsed)
    for engine in engines.values():
        await engine.dispose()
    b, s = statistics.median(times[big]), statistics.median(times[small])
    print("tick dispatching 1,000 due backups (median of 5)")
    print(f"  100,000 instances / 10,000 policies: {b * 1000:7.1f} ms")
    print(f"    1,000 instances /    100 policies: {s * 1000:7.1f} ms   (reference)")
    print(f"  ratio big/small: {b / s:.2f}   (target <= 1.5; wall time target <= 1000 ms)")


if __name__ == "__main__":
    asyncio.run(main())
