"""Deterministic test payloads and the chunk streams that feed them to drivers."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Callable

from app.storage import BackupStorageDriver

MiB = 1024 * 1024


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def chunked(data: bytes, size: int = MiB + 7) -> AsyncIterator[bytes]:
    # An odd chunk size makes chunk and part boundaries disagree, as they will in real use.
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await asyncio.sleep(0)


async def failing(data: bytes, after: int, error: Exception) -> AsyncIterator[bytes]:
    """Yield `after` bytes of `data` in 1 MiB chunks, then raise `error`."""
    async for chunk in chunked(data[:after], MiB):
        yield chunk
    raise error


async def calling(data: bytes, at: int, action: Callable[[], None]) -> AsyncIterator[bytes]:
    """Stream `data`, running `action` (e.g. killing the server) once `at` bytes went out."""
    sent = 0
    async for chunk in chunked(data, MiB):
        if sent >= at >= 0:
            action()
            at = -1
            await asyncio.sleep(0.2)
        yield chunk
        sent += len(chunk)


async def read_all(driver: BackupStorageDriver, key: str) -> bytes:
    return b"".join([chunk async for chunk in driver.get(key)])
