"""API list benchmark: GET /backup-policies?limit=50 vs a bare JSON route of the same app.

Seeds 10,000 policies and 20,000 attached instances, serves the app with uvicorn (one
process), and runs wrk (Debian package) at 32 connections against: the policy list as an
admin, as a user, and /api/v1/health (no database) — the reference. Prints requests/s, p99
latency and the ratios; three times: with the read cache (as served), with it while
another connection edits policies, and without it.
Run by hand:  .venv/bin/python bench/api_bench.py [--duration 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import asyncpg

from app.security import hash_password, token_digest

ROOT = Path(__file__).resolve().parent.parent
PG = os.environ.get("IBP_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
DB = "ibp_bench_api"
PORT = 8765


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


def wrk(url: str, token: str | None, duration: int, connections: int) -> tuple[float, float]:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", url]
    if token:
        cmd[1:1] = ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    assert p99 is not None, out
    value = float(p99.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    if "Non-2xx" in out:
        raise SystemExit(f"non-2xx responses from {url}:\n{out}")
    return rps, value


class Writer(threading.Thread):
    """Edits random policies (as the tick and other users do) at a steady rate, so the read
    cache is measured while notifications keep retiring pages."""

    def __init__(self, per_second: float) -> None:
        super().__init__(daemon=True)
        self.per_second = per_second
        self.stop = threading.Event()
        self.writes = 0

    def run(self) -> None:
        asyncio.run(self._write())

    async def _write(self) -> None:
        conn = await asyncpg.connect(f"{PG}/{DB}")
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM backup_policies")]
        rng = random.Random(1)
        while not self.stop.is_set():
            await conn.execute(
                "UPDATE backup_policies SET next_run_at = next_run_at + interval '1 minute'"
                " WHERE id = $1",
                rng.choice(ids),
            )
            self.writes += 1
            await asyncio.sleep(1 / self.per_second)
        await conn.close()


def measure(
    env: dict[str, str], admin: str, user: str, args: argparse.Namespace, writes: float = 0
) -> None:
    """Serve the app with `env`, wrk each target, print the table (ratios against /health)."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--port",
            str(PORT),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=ROOT,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{PORT}/api/v1"
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/health")
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(0.5)  # the read cache's change feed connects
        targets = [
            ("bare /health (reference)", f"{base}/health", None),
            ("policies?limit=50 as admin", f"{base}/backup-policies?limit=50", admin),
            ("policies?limit=50 as user", f"{base}/backup-policies?limit=50", user),
        ]
        for _, url, token in targets:  # warm-up
            wrk(url, token, 2, args.connections)
        writer = Writer(writes) if writes else None
        if writer:
            writer.start()
        results = {
            name: wrk(url, token, args.duration, args.connections) for name, url, token in targets
        }
        if writer:
            writer.stop.set()
            writer.join()
            print(f"({writer.writes} policy edits by another connection during the run)")
        ref_rps = results["bare /health (reference)"][0]
        print(f"{'target':32} {'req/s':>9} {'p99 ms':>8} {'ratio':>6}")
        for name, (rps, p99) in results.items():
            print(f"{name:32} {rps:9.0f} {p99:8.1f} {rps / ref_rps:6.2f}")
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--writes", type=float, default=20, help="policy edits/s, second run")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    admin, user = asyncio.run(seed(10_000, 20_000))
    env = {
        **os.environ,
        "IBP_DATABASE_URL": f"{PG.replace('postgresql://', 'postgresql+asyncpg://')}/{DB}",
        "IBP_DB_POOL_SIZE": "20",
    }
    # As served (the read cache on: repeated pages come from memory); the same while another
    # connection edits policies (each edit retires the admin's cached pages); then every
    # request answered from PostgreSQL (IBP_READ_CACHE=false): two prepared statements each.
    print("\nIBP_READ_CACHE=true")
    measure({**env, "IBP_READ_CACHE": "true"}, admin, user, args)
    print(f"\nIBP_READ_CACHE=true, {args.writes:g} policy edits/s elsewhere")
    measure({**env, "IBP_READ_CACHE": "true"}, admin, user, args, writes=args.writes)
    print("\nIBP_READ_CACHE=false")
    measure({**env, "IBP_READ_CACHE": "false"}, admin, user, args)


if __name__ == "__main__":
    main()
