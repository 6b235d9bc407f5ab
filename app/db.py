"""Engine and session builders (the HTTP edge's per-request session is in app.deps)."""

from __future__ import annotations

import asyncpg.exceptions
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.config import Settings
from app.errors import Conflict

# PostgreSQL cannot be reached (restarted, network, a connection killed, no free connection):
# nothing wrong with the request or the job, and worth trying again shortly.
DATABASE_UNREACHABLE: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.ObjectNotInPrerequisiteStateError,
)


def database_unreachable(exc: BaseException) -> bool:
    """The one answer to "is this error PostgreSQL being away?" (the API's 503, the worker's
    retries)."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        inner = exc.orig.__cause__ if exc.orig is not None else None
        return inner is not None and database_unreachable(inner)
    return isinstance(exc, DATABASE_UNREACHABLE)


def build_engine(settings: Settings, *, pre_ping: bool = True) -> AsyncEngine:
    """`pre_ping` tests each pooled connection before use (three round trips with asyncpg):
    a job must not fail because PostgreSQL restarted since its connection was pooled. The API
    goes without: after a restart one request per process answers 503 (Retry-After) and the
    pool is renewed, which costs less than pinging on every request."""
    return create_async_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_pre_ping=pre_ping,
    )


def build_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


async def flush_or_conflict(session: AsyncSession, message: str) -> None:
    """Flush, turning a unique-constraint violation into a 409 with the given words."""
    try:
        await session.flush()
    except IntegrityError as exc:
        raise Conflict(message) from exc
