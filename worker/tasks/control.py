"""Control-queue jobs: the minute tick (dispatch + reaping stale work)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from app.engine.lifecycle import (
    reap_stale,
    reap_stale_restores,
    record_failure,
    redispatch_lost_jobs,
    remove_emptied_instances,
)
from app.engine.protection import evaluate_protection
from app.engine.verification import due_for_verification
from app.engine.webhooks.delivery import next_due, prune_log
from app.engine.webhooks.events import emit_restore
from app.engine.workers import fail_unattended
from app.metrics import TICK_DISPATCHED, TICK_REAPED, TICK_SECONDS, TICK_SKIPPED
from app.models import Backup
from app.queues import JobQueue, enqueue_verify, enqueue_webhook_delivery
from app.values import WebhookEvent
from worker.jobs import JobContext, Resources, resources
from worker.tasks.tick import run_tick


async def tick(ctx: JobContext) -> str:
    res = resources(ctx)
    settings = res.settings
    started = time.monotonic()
    now = datetime.now(UTC)
    grace = timedelta(hours=settings.catch_up_grace_hours)
    reaped = {"backup": 0, "restore": 0}
    async with res.session() as session:
        stale = timedelta(minutes=settings.stale_backup_minutes)
        start_within = max(grace, timedelta(hours=1))
        reaped["backup"] += len(await reap_stale(session, now, stale, start_within))
        reaped["restore"] += len(await reap_stale_restores(session, now, stale, start_within))
        for row in await fail_unattended(session, now):
            if isinstance(row, Backup):
                reaped["backup"] += 1
                await record_failure(session, row, row.error or "", now)
            else:
                reaped["restore"] += 1
                await emit_restore(session, WebhookEvent.RESTORE_FAILED, row)
        lost = JobQueue()
        resent = await redispatch_lost_jobs(session, lost, now)
        await remove_emptied_instances(session)
        # Webhook retries come due here (and after any restart): one delivery run sends them.
        if (due := await next_due(session)) is not None and due <= now:
            enqueue_webhook_delivery(lost)
        await prune_log(session, now)
    for kind, count in reaped.items():  # committed: counted
        TICK_REAPED.labels(kind=kind).inc(count)
    await lost.flush(res.redis)
    result = await run_tick(res.sessionmaker, res.redis, now, grace)
    async with res.session() as session:
        changes = await evaluate_protection(session, now, timedelta(hours=settings.rpo_grace_hours))
    TICK_DISPATCHED.inc(len(result.dispatched))
    TICK_SKIPPED.inc(result.skipped)
    verifies = await schedule_verifications(res, now)
    TICK_SECONDS.observe(time.monotonic() - started)
    return (
        f"policies={result.policies} dispatched={len(result.dispatched)} "
        f"skipped={result.skipped} reaped={sum(reaped.values())} resent={resent} "
        f"verifies={verifies} protection_changes={len(changes)}"
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
