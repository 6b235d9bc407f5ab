"""A flood of wrong-password logins must not stall the API: argon2 runs off the event loop.

Measured on a real uvicorn (its own event loop in a thread), so a blocked loop shows as slow
`/health` answers; the throttle is raised out of the way so every attempt costs a hash.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.main import create_app
from app.security import hash_password, verify_password
from tests.api.live import serve

FLOODERS = 4
ATTEMPTS_EACH = 6


def _hash_check_seconds() -> float:
    """What one argon2 check costs on this machine now (the median of three)."""
    password_hash = hash_password("the right one")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        verify_password("a wrong one", password_hash)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def test_a_login_flood_leaves_health_responsive(
    settings: Settings, engine: AsyncEngine
) -> None:
    unthrottled = settings.model_copy(
        update={"login_attempts_per_address": 10_000, "login_failures_per_account": 10_000}
    )
    check_seconds = _hash_check_seconds()
    latencies: list[float] = []
    flooding = True

    async def flood(client: httpx.AsyncClient, n: int) -> None:
        for i in range(ATTEMPTS_EACH):
            response = await client.post(
                "/auth/login", json={"email": f"flood{n}-{i}@example.com", "password": "wrong"}
            )
            assert response.status_code == 401, response.text

    async def probe(client: httpx.AsyncClient) -> None:
        while flooding:
            start = time.perf_counter()
            response = await client.get("/health")
            latencies.append(time.perf_counter() - start)
            assert response.status_code == 200
            await asyncio.sleep(0.02)

    with serve(create_app(unthrottled)) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            await client.get("/health")
            probing = asyncio.create_task(probe(client))
            await asyncio.sleep(0.1)
            await asyncio.gather(*(flood(client, n) for n in range(FLOODERS)))
            flooding = False
            await probing

    assert len(latencies) >= 10, latencies
    # Blocked by argon2, /health waits for the hash in progress (or several): about half a
    # check or more. Off the loop it answers in a few ms, whatever the hashing threads do.
    assert statistics.median(latencies) < check_seconds / 5, (check_seconds, latencies)
