"""The heartbeat a long job keeps on its row, so the reaper can tell a live job from a lost one."""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy import update

from app.models import Backup, Restore
from app.models.base import utcnow
from worker.context import WorkerContext

HEARTBEAT_S = 5.0


async def keep_alive(
    ctx: WorkerContext, model: type[Backup] | type[Restore], row_id: uuid.UUID, progress: list[int]
) -> None:
    """Every few seconds: heartbeat_at = now and the job's progress (0-99), while in progress."""
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        async with ctx["sessionmaker"]() as session:
            await session.execute(
                update(model)
                .where(model.id == row_id, model.status == "in_progress")
                .values(heartbeat_at=utcnow(), progress=min(99, progress[0]))
            )
            await session.commit()
