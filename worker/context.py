"""The typed context every job receives (arq passes a dict; this says what is in it)."""

from __future__ import annotations

from typing import TypedDict

from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings


class WorkerContext(TypedDict, total=False):
    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    redis: ArqRedis
    job_id: str
    job_try: int
