"""Control-queue job: send the webhook deliveries that are due (app.engine.webhooks.delivery).

Queued after every commit that wrote deliveries, by the minute tick while retries are due,
and by itself, deferred, when a retry comes due before the next tick (the 5 s one).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.engine.webhooks.delivery import DeliverySettings, deliver_due, next_due
from app.queues import JobQueue, enqueue_webhook_delivery
from worker.jobs import JobContext, resources

TICK = timedelta(minutes=1)


async def deliver_webhooks(ctx: JobContext) -> str:
    res = resources(ctx)
    settings = DeliverySettings(allow_private=res.settings.webhooks_allow_private)
    run = await deliver_due(res.sessionmaker, settings)
    async with res.session() as session:
        due = await next_due(session)
    now = datetime.now(UTC)
    if due is not None and due - now < TICK:
        jobs = JobQueue()
        # One deferred run per due second, however many runs ask for it.
        wait = max((due - now).total_seconds(), 0.0) + 0.1
        enqueue_webhook_delivery(jobs, wait, f"deliver_webhooks:{int(due.timestamp())}")
        await jobs.flush(res.redis)
    return (
        f"attempted={run.attempted} succeeded={run.succeeded} gave_up={run.failed} "
        f"disabled={len(run.disabled)}"
    )
