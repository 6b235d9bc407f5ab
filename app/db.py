"""Engine and session builders; sessions commit at the edge and jobs are enqueued after commit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import asyncpg
from arq.connections import ArqRedis
from fastapi import Depends, Request
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.cache import ReadCache
from app.config import Settings


def build_engine(settings: Settings) -> AsyncEngine:
    return create_async_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_pre_ping=True,
    )


def build_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


FLUSH_CONCURRENCY = 100


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    function: str
    args: tuple[Any, ...]
    job_id: str | None
    queue_name: str
    # The row it works on says it is still waiting, and the scheduler tick sends the jobs of
    # such rows again (app.backups.lifecycle.redispatch_lost_jobs): losing this enqueue only
    # delays the work.
    redispatched: bool = False


@dataclass
class JobQueue:
    """Jobs a request wants enqueued; sent only after its transaction committed."""

    jobs: list[Job] = field(default_factory=list)

    def add(
        self,
        function: str,
        *args: Any,
        queue_name: str,
        job_id: str | None = None,
        redispatched: bool = False,
    ) -> None:
        self.jobs.append(Job(function, args, job_id, queue_name, redispatched))

    async def flush(self, redis: ArqRedis | None) -> None:
        """Enqueue everything; a job the tick sends again may fail to enqueue (logged), others
        raise (the request answers 503: nothing durable says the work is wanted)."""
        jobs, self.jobs = self.jobs, []
        if redis is None:
            return
        # Each enqueue is a few round trips; a tick may send a thousand, so overlap them.
        for start in range(0, len(jobs), FLUSH_CONCURRENCY):
            batch = jobs[start : start + FLUSH_CONCURRENCY]
            outcomes = await asyncio.gather(
                *(
                    redis.enqueue_job(
                        job.function, *job.args, _job_id=job.job_id, _queue_name=job.queue_name
                    )
                    for job in batch
                ),
                return_exceptions=True,
            )
            for job, outcome in zip(batch, outcomes, strict=True):
                if not isinstance(outcome, BaseException):
                    continue
                if not (job.redispatched and isinstance(outcome, Exception)):
                    raise outcome
                log.warning(
                    "could not queue %s (%s: %s); the scheduler tick will send it again",
                    job.job_id or job.function,
                    type(outcome).__name__,
                    outcome,
                )


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


async def flush_or_conflict(session: AsyncSession, message: str) -> None:
    """Flush, turning a unique-constraint violation into a 409 with the given words."""
    from sqlalchemy.exc import IntegrityError

    from app.errors import Conflict

    try:
        await session.flush()
    except IntegrityError as exc:
        raise Conflict(message) from exc
