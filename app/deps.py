"""Request dependencies of the HTTP edge: one session per request, committed before the
response, and the jobs it wants sent once that commit succeeded."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, Request
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.cache import ReadCache
from app.config import Settings
from app.queues import JobQueue


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    sessionmaker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    queue = JobQueue()
    request.state.job_queue = queue
    async with sessionmaker() as session:
        yield session
        await session.commit()
    if request.method not in ("GET", "HEAD"):
        request.app.state.read_cache.reset()  # this client reads its own writes at once
    await queue.flush(request.app.state.arq)


# scope="function": commit (and enqueue) before the response is sent, so a client never gets a
# success for a transaction that then fails, nor reads its own write too early.
_session = Depends(get_session, scope="function")


async def get_job_queue(request: Request, _: AsyncSession = _session) -> JobQueue:
    queue: JobQueue = request.state.job_queue
    return queue


SessionDep = Annotated[AsyncSession, _session]
JobQueueDep = Annotated[JobQueue, Depends(get_job_queue)]


async def driver_connection(session: AsyncSession) -> asyncpg.Connection:
    """The asyncpg connection under a session (statements sent on it bypass SQLAlchemy)."""
    conn = await session.connection()
    raw = await conn.get_raw_connection()
    driver: asyncpg.Connection = raw.driver_connection
    return driver


async def build_read_pool(settings: Settings) -> asyncpg.Pool:
    """Plain asyncpg connections for the hottest reads, beside the SQLAlchemy engine's pool.

    A SQLAlchemy session costs more than the whole list query (checkout, pre-ping, the
    session's bookkeeping), so endpoints that only read, with their own prepared statements,
    borrow these instead.
    """
    pool: asyncpg.Pool = await asyncpg.create_pool(
        asyncpg_dsn(settings), min_size=0, max_size=settings.db_pool_size
    )
    return pool


def asyncpg_dsn(settings: Settings) -> str:
    """The database URL as asyncpg itself takes it."""
    url = make_url(settings.database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


class Reads:
    """A read connection, taken only when a request first needs one (a read-cache miss).

    From the lifespan's pool; an app given its sessionmaker (tests, embedding) reads through
    one of its sessions instead, seeing what it sees.
    """

    def __init__(self, state: Any) -> None:
        self.cache: ReadCache = state.read_cache
        self._state = state
        self._stack = AsyncExitStack()
        self._conn: asyncpg.Connection | None = None

    async def connection(self) -> asyncpg.Connection:
        if self._conn is None:
            self._conn = await self._stack.enter_async_context(self._open())
        return self._conn

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[asyncpg.Connection]:
        pool: asyncpg.Pool | None = self._state.read_pool
        if pool is not None:
            async with pool.acquire() as conn:
                yield conn
            return
        sessionmaker: async_sessionmaker[AsyncSession] = self._state.sessionmaker
        async with sessionmaker() as session:
            yield await driver_connection(session)
            await session.commit()

    async def close(self) -> None:
        await self._stack.aclose()


async def get_reads(request: Request) -> AsyncIterator[Reads]:
    reads = Reads(request.app.state)
    try:
        yield reads
    finally:
        await reads.close()


ReadsDep = Annotated[Reads, Depends(get_reads, scope="function")]
