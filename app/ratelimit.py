"""Fixed-window counters in Redis: limits that hold across every API process.

A counter is one key: created at 0 with the window as its expiry, then incremented; it is gone
when the window ends. Fixed windows let up to twice the limit through around a window's end,
which is fine for throttling logins, and the key's TTL is the exact `Retry-After`. Small enough
to keep here rather than bring a rate-limit library with its own Redis connection: the API
already holds a Redis pool (arq's), and login needs "check now, count only failures later".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from redis.asyncio import Redis


@dataclass(frozen=True)
class Limit:
    """At most `count` events in a window of `seconds`."""

    count: int
    seconds: int


async def hit(redis: Redis, key: str, limit: Limit) -> int | None:
    """Count one event. When it is over the limit: the seconds until the window ends."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(key, 0, ex=limit.seconds, nx=True)
        pipe.incr(key)
        pipe.pttl(key)
        _, count, pttl = await pipe.execute()
    return _seconds_left(pttl) if int(count) > limit.count else None


async def exhausted(redis: Redis, key: str, limit: Limit) -> int | None:
    """Without counting: the seconds until the window ends if its limit is already reached."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(key)
        pipe.pttl(key)
        count, pttl = await pipe.execute()
    return _seconds_left(pttl) if count is not None and int(count) >= limit.count else None


def _seconds_left(pttl: int) -> int:
    """Whole seconds, rounded up: a client that waits that long finds the window over."""
    return max(math.ceil(int(pttl) / 1000), 1)
