"""Control-queue jobs: the minute tick (dispatch + reaping stale work)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.backups.lifecycle import reap_stale
from worker.context import WorkerContext
from worker.tasks.tick import run_tick


async def tick(ctx: WorkerContext) -> str:
    settings = ctx["settings"]
    now = datetime.now(UTC)
    grace = timedelta(hours=settings.catch_up_grace_hours)
    async with ctx["sessionmaker"]() as session:
        reaped = await reap_stale(
            session,
            now,
            timedelta(minutes=settings.stale_backup_minutes),
            max(grace, timedelta(hours=1)),
        )
        await session.commit()
    result = await run_tick(ctx["sessionmaker"], ctx.get("redis"), now, grace)
    return (
        f"policies={result.policies} dispatched={len(result.dispatched)} "
        f"skipped={result.skipped} reaped={len(reaped)}"
    )
