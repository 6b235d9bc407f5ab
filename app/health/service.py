"""Readiness: can this API process reach PostgreSQL and Redis right now?"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

# A probe answers within this or counts as unreachable: an orchestrator's readiness probe
# usually waits a few seconds at most, and a hung backend must not hang it.
PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Probe:
    part: str  # "postgresql", "redis"
    name: str  # how the words name it
    error: str | None  # None: reachable; else the exception's class, never its text


def _cause(exc: Exception) -> str:
    """The class of what went wrong, under SQLAlchemy's wrapper: ConnectionRefusedError,
    CannotConnectNowError..."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        inner = exc.orig.__cause__ or exc.orig
        return type(inner).__name__
    return type(exc).__name__


async def _probe(part: str, name: str, call: Callable[[], Awaitable[Any]]) -> Probe:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            await call()
    except TimeoutError:
        return Probe(part, name, f"no answer within {PROBE_TIMEOUT_S:.0f} s")
    except Exception as exc:  # any failure is "not ready"; its text may name hosts: not shown
        return Probe(part, name, _cause(exc))
    return Probe(part, name, None)


async def readiness(sessionmaker: async_sessionmaker[AsyncSession], redis: Any) -> list[Probe]:
    """Both probes, at once."""

    async def select_one() -> None:
        async with sessionmaker() as session:
            await session.execute(text("SELECT 1"))

    return list(
        await asyncio.gather(
            _probe("postgresql", "PostgreSQL", select_one),
            _probe("redis", "Redis", redis.ping),
        )
    )
