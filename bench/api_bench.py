"""API list benchmark: GET /backup-policies?limit=50 vs the same statements on raw asyncpg.

Seeds 10,000 policies and 20,000 attached instances and serves the app with uvicorn (one
process). Beside the app's routes this script mounts, in the same app and only here, a reference
route that runs the statements the list runs (the token lookup by hash, then the page with its
total, the same SQL shape) on its own asyncpg pool and returns the rows as JSON with orjson.
wrk runs 32 connections against both, as an admin (10,000 policies) and as a user (100). The sides
alternate over rounds; prints each side's median requests/s and p99 latency and the ratio; the
targets are a ratio >= 0.5 and p99 < 100 ms.
Run by hand:  .venv/bin/python bench/api_bench.py [--duration 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, Request, Response

from app.security import hash_password, token_digest

ROOT = Path(__file__).resolve().parent.parent
PG = os.environ.get("IBP_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
DB = "ibp_bench_api"
PORT = 8765
POOL_SIZE = 20
TARGET_RATIO = 0.5
TARGET_P99_MS = 100.0


def _sh(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run(args, check=True, cwd=ROOT, env=env, capture_output=True)


async def seed(policies: int, instances: int) -> tuple[str, str]:
    conn = await asyncpg.connect(f"{PG}/postgres")
    await conn.execute(f'DROP DATABASE IF EXISTS "{DB}"')
    await conn.execute(f'CREATE DATABASE "{DB}"')
    await conn.close()
    env = {
        **os.environ,
        "IBP_DATABASE_URL": f"{PG.replace('postgresql://', 'postgresql+asyncpg://')}/{DB}",
    }
    _sh(sys.executable, "-m", "alembic", "upgrade", "head", env=env)
    conn = await asyncpg.connect(f"{PG}/{DB}")
    pw = hash_password("bench-password")
    zones = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Sydney"]
    # 1 admin, 1,000 users; the bench user (user 1) owns 100 policies, the rest are spread.
    await conn.execute(
        """INSERT INTO users (id, email, name, password_hash, role, timezone)
           SELECT gen_random_uuid(), 'user' || g || '@bench', 'User ' || g, $1,
                  CASE WHEN g = 0 THEN 'admin' ELSE 'user' END, ($2::text[])[1 + g % 5]
           FROM generate_series(0, 1000) g""",
        pw,
        zones,
    )
    await conn.execute("INSERT INTO locations (id, name) VALUES (gen_random_uuid(), 'bench')")
    await conn.execute(
        """INSERT INTO hypervisors (id, name, location_id, libvirt_uri, max_concurrent_backups,
                                    scratch_dir)
           SELECT gen_random_uuid(), 'hv' || g, (SELECT id FROM locations), 'qemu:///system', 2,
                  '/var/tmp' FROM generate_series(1, 20) g"""
    )
    await conn.execute(
        """WITH owners AS (
             SELECT id, row_number() OVER (ORDER BY length(email), email) AS n FROM users
                      WHERE role = 'user')
           INSERT INTO backup_policies (id, owner_id, name, frequency, hour, day_of_week,
               max_incremental_chain, retention_count, backup_device, status, next_run_at,
               skipped_runs)
           SELECT gen_random_uuid(),
                  (SELECT id FROM owners WHERE n = CASE WHEN g <= 100 THEN 1
                                                       ELSE 2 + g % 999 END),
                  'policy ' || g,
                  CASE WHEN g % 3 = 0 THEN 'weekly' ELSE 'daily' END, g % 24,
                  CASE WHEN g % 3 = 0 THEN 'monday' END, 6, 3, 'primary', 'active',
                  now() + (g % 1440) * interval '1 minute', 0
           FROM generate_series(1, $1) g""",
        policies,
    )
    await conn.execute(
        """WITH p AS (SELECT id, owner_id, row_number() OVER (ORDER BY id) AS n
                      FROM backup_policies),
                h AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM hypervisors)
           INSERT INTO instances (id, name, owner_id, hypervisor_id, domain_name, status,
                                  backup_policy_id)
           SELECT gen_random_uuid(), 'vm' || g, p.owner_id, h.id, 'dom' || g, 'deployed', p.id
           FROM generate_series(1, $1) g
           JOIN p ON p.n = 1 + g % $2
           JOIN h ON h.n = 1 + g % 20""",
        instances,
        policies,
    )
    tokens = []
    for email in ("user0@bench", "user1@bench"):
        token = "ibpt_" + secrets.token_urlsafe(32)
        await conn.execute(
            """INSERT INTO api_tokens (id, user_id, kind, name, token_hash, prefix, created_at)
               SELECT gen_random_uuid(), id, 'personal', 'bench', $2, $3, now()
               FROM users WHERE email = $1""",
            email,
            token_digest(token),
            token[:12],
        )
        tokens.append(token)
    await conn.execute("ANALYZE")
    await conn.close()
    return tokens[0], tokens[1]


# The statements the list runs (see app.policies.service.list_policies and
# app.auth.service.authenticate), written out for asyncpg.
TOKEN_SQL = """
SELECT t.*, u.* FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1"""
_SCOPE = ("", "WHERE p.owner_id = $3")  # admin, user
PAGE_SQL = [
    f"""
SELECT p.owner_id, p.name, p.frequency, p.hour, p.day_of_week, p.max_incremental_chain,
       p.retention_count, p.backup_device, p.status, p.last_error, p.last_error_at,
       p.next_run_at, p.skipped_runs, p.last_skip_reason, p.id, p.created_at, p.updated_at,
       u.timezone,
       (SELECT count(*) FROM instances i WHERE i.backup_policy_id = p.id) AS instance_count,
       (SELECT count(*) FROM backup_policies p {where}) AS total
FROM backup_policies p JOIN users u ON u.id = p.owner_id {where}
ORDER BY p.created_at DESC, p.id DESC LIMIT $1 OFFSET $2"""
    for where in _SCOPE
]


def bench_app() -> FastAPI:
    """The app as served, plus the reference route on its own asyncpg pool."""
    from app.main import create_app

    app = create_app()
    served = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with served(app):
            pool = await asyncpg.create_pool(f"{PG}/{DB}", min_size=0, max_size=POOL_SIZE)
            app.state.reference_pool = pool
            try:
                yield
            finally:
                await pool.close()

    app.router.lifespan_context = lifespan

    @app.get("/reference/backup-policies", include_in_schema=False)
    async def reference(request: Request, limit: int = 50, offset: int = 0) -> Response:
        token = request.headers["authorization"].removeprefix("Bearer ")
        async with app.state.reference_pool.acquire() as conn:
            who = await conn.fetchrow(TOKEN_SQL, token_digest(token))
            if who is None or who["revoked_at"] is not None:
                return Response(status_code=401)
            admin = who["role"] == "admin"
            scope = () if admin else (who["user_id"],)
            rows = await conn.fetch(PAGE_SQL[not admin], limit, offset, *scope)
        body: dict[str, Any] = {
            "items": [dict(row) for row in rows],
            "total": rows[0]["total"] if rows else 0,
            "limit": limit,
            "offset": offset,
        }
        return Response(orjson.dumps(body, default=str), media_type="application/json")

    return app


def wrk(url: str, token: str, duration: int, connections: int) -> tuple[float, float]:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", url]
    cmd[1:1] = ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    assert p99 is not None, out
    value = float(p99.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    if "Non-2xx" in out:
        raise SystemExit(f"non-2xx responses from {url}:\n{out}")
    return rps, value


def _median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """Median requests/s and median p99 of a side's rounds."""
    return statistics.median(r for r, _ in runs), statistics.median(p for _, p in runs)


def measure(env: dict[str, str], admin: str, user: str, args: argparse.Namespace) -> bool:
    """Serve the bench app, wrk each side as admin and as user, print the table; True when
    both roles meet the targets."""
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        cwd=ROOT,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{PORT}"
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/api/v1/health")
                break
            except OSError:
                time.sleep(0.1)
        sides = {
            "list": f"{base}/api/v1/backup-policies?limit=50",
            "reference": f"{base}/reference/backup-policies?limit=50",
        }
        met = True
        print(f"{'role':6} {'side':10} {'req/s':>9} {'p99 ms':>8} {'ratio':>6}")
        for role, token in (("admin", admin), ("user", user)):
            for url in sides.values():  # warm-up
                wrk(url, token, 2, args.connections)
            # The sides alternate, so a neighbour's load on the machine falls on both alike.
            runs: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
            for round_ in range(args.rounds):
                for side in sorted(sides, reverse=bool(round_ % 2)):
                    runs[side].append(wrk(sides[side], token, args.duration, args.connections))
            (rps, p99), (ref_rps, ref_p99) = (_median(runs[side]) for side in sides)
            ok = rps / ref_rps >= TARGET_RATIO and p99 < TARGET_P99_MS
            met = met and ok
            print(f"{role:6} {'reference':10} {ref_rps:9.0f} {ref_p99:8.1f}")
            print(
                f"{role:6} {'list':10} {rps:9.0f} {p99:8.1f} {rps / ref_rps:6.2f}"
                f"  {'ok' if ok else 'MISSED'}"
            )
        return met
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10, help="seconds per side and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvicorn

        uvicorn.run(bench_app(), port=PORT, log_level="warning", access_log=False)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    admin, user = asyncio.run(seed(10_000, 20_000))
    env = {
        **os.environ,
        "IBP_DATABASE_URL": f"{PG.replace('postgresql://', 'postgresql+asyncpg://')}/{DB}",
        "IBP_DB_POOL_SIZE": str(POOL_SIZE),
    }
    print(
        f"{args.connections} connections, {args.rounds} rounds of {args.duration} s per side "
        "(medians); targets: ratio >= "
        f"{TARGET_RATIO}, p99 < {TARGET_P99_MS:.0f} ms"
    )
    if not measure(env, admin, user, args):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
