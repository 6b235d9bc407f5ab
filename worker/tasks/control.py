"""Control-queue jobs: the minute tick (dispatch + reaping stale work)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.engine.lifecycle import (
    reap_stale,
    reap_stale_restores,
    record_failure,
    redispatch_lost_jobs,
)
from app.engine.verification import due_for_verification
from app.engine.workers import fail_unattended
from app.models import Backup
from app.queues import JobQueue, enqueue_verify
from worker.jobs import JobContext, Resources, resources
from worker.tasks.tick import run_tick


async def tick(ctx: JobContext) -> str:
    res = resources(ctx)
    settings = res.settings
    now = datetime.now(UTC)
    grace = timedelta(hours=settings.catch_up_grace_hours)
    async with res.session() as session:
        reaped = await reap_stale(
            session,
            now,
            timedelta(minutes=settings.stale_backup_minutes),
            max(grace, timedelta(hours=1)),
        )
        reaped += await reap_stale_restores(
            session,
            now,
            timedelta(minutes=settings.stale_backup_minutes),
            max(grace, timedelta(hours=1)),
        )
        for row in await fail_unattended(session, now):
            reaped.append(row.id)
            if isinstance(row, Backup):
                await record_failure(session, row, row.error or "", now)
        lost = JobQueue()
        resent = await redispatch_lost_jobs(session, lost, now)
    await lost.flush(res.redis)
    result = await run_tick(res.sessionmaker, res.redis, now, grace)
    verifies = await schedule_verifications(res, now)
    return (
        f"policies={result.policies} dispatched={len(result.dispatched)} "
        f"skipped={result.skipped} reaped={len(reaped)} resent={resent} verifies={verifies}"
    )


async def schedule_verifications(res: Resources, now: datetime) -> int:
    """Enqueue a verify of each instance's newest backup whose chain was not checked lately.

    The fixed job id (verify:<backup id>) keeps repeated ticks from queueing one twice.
    """
    hours = res.settings.verify_interval_hours
    if hours <= 0:
        return 0
    jobs = JobQueue()
    async with res.session() as session:
        due = await due_for_verification(session, now, timedelta(hours=hours))
    for backup_id, hypervisor_id in due:
        enqueue_verify(jobs, backup_id, hypervisor_id)
    await jobs.flush(res.redis)
    return len(due)
