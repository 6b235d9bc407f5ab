"""Lost enqueues heal: the tick sends again the jobs of rows still waiting, never twice."""

from __future__ import annotations

import socket
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis.exceptions as redis_errors
from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.engine.lifecycle import redispatch_lost_jobs
from app.engine.workers import register
from app.models import Instance
from app.queues import CONTROL_QUEUE, JobQueue, enqueue_backup, hypervisor_queue
from tests.factories import create_backup, create_instance, create_restore, create_user
from worker.jobs import JobContext
from worker.tasks.control import tick


def _dead_redis() -> ArqRedis:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ArqRedis(host="127.0.0.1", port=port, socket_connect_timeout=2)


async def test_waiting_rows_get_their_jobs_again_once(
    session: AsyncSession, arq_redis: ArqRedis
) -> None:
    instance = await create_instance(session, await create_user(session))
    now = datetime.now(UTC)
    old = now - timedelta(minutes=5)

    async def backup(status: str, created_at: datetime, minute: int, **extra: object) -> str:
        row = await create_backup(
            session,
            instance,
            status=status,
            created_at=created_at,
            scheduled_for=now - timedelta(minutes=minute),
            **extra,
        )
        return str(row.id)

    lost = await backup("pending", old, 1)
    just_made = await backup("pending", now, 2)  # its request may still be sending the job
    done = await backup("completed", old, 3)
    deleting = await backup("deleting", old, 4)
    backing_off = await backup("deleting", old, 5, delete_attempts=3)
    restore = await create_restore(session, instance, status="pending", created_at=old)

    for _ in range(2):  # two ticks
        jobs = JobQueue()
        await redispatch_lost_jobs(session, jobs, now)
        await jobs.flush(arq_redis)

    queue = hypervisor_queue(instance.hypervisor_id)
    queued = [job.job_id for job in await arq_redis.queued_jobs(queue_name=queue)]
    assert sorted(queued) == sorted([f"backup:{lost}", f"restore:{restore.id}"])
    control = {job.job_id for job in await arq_redis.queued_jobs(queue_name=CONTROL_QUEUE)}
    assert f"delete:{deleting}" in control
    assert f"delete:{backing_off}" not in control
    assert f"backup:{just_made}" not in queued and f"backup:{done}" not in queued


async def test_a_lost_enqueue_of_a_redispatched_job_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis = _dead_redis()
    try:
        jobs = JobQueue()
        backup_id = uuid.uuid4()
        enqueue_backup(jobs, backup_id, backup_id)
        await jobs.flush(redis)  # no exception: the tick sends it again
        assert f"could not queue backup:{backup_id}" in caplog.text
        jobs.add("verify_backup", "x", queue_name=CONTROL_QUEUE, job_id="verify:x")
        with pytest.raises(redis_errors.ConnectionError):
            await jobs.flush(redis)  # nothing durable would bring this one back
    finally:
        await redis.aclose()


async def test_the_minute_tick_resends_lost_jobs(
    worker_ctx: JobContext,
    real_sessionmaker: async_sessionmaker[AsyncSession],
    arq_redis: ArqRedis,
) -> None:
    async with real_sessionmaker() as session:
        instance = await create_instance(session, await create_user(session))
        # The hypervisor's worker runs; only the job was lost (with Redis's memory, say).
        await register(session, instance.hypervisor_id, "hv", 1, datetime.now(UTC), lambda _: True)
        lost = await create_backup(
            session,
            instance,
            status="pending",
            created_at=datetime.now(UTC) - timedelta(minutes=3),
            started_at=None,
            completed_at=None,
        )
        await session.commit()

    summary = await tick(worker_ctx)

    assert "resent=1" in summary
    queue = hypervisor_queue(instance.hypervisor_id)
    assert [j.job_id for j in await arq_redis.queued_jobs(queue_name=queue)] == [
        f"backup:{lost.id}"
    ]


async def test_the_minute_tick_removes_an_instance_its_last_deletion_job_left(
    worker_ctx: JobContext,
    real_sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    """Deleted with its backups; the last deletion job removed the backup and was killed
    before removing the instance. The tick finishes it; an instance still deleting a backup,
    and one not being deleted, stay."""
    async with real_sessionmaker() as session:
        owner = await create_user(session)
        emptied = await create_instance(session, owner, deleting_at=datetime.now(UTC))
        busy = await create_instance(session, owner, deleting_at=datetime.now(UTC))
        await create_backup(session, busy, status="deleting")
        kept = await create_instance(session, owner)
        await session.commit()

    await tick(worker_ctx)

    async with real_sessionmaker() as session:
        assert await session.get(Instance, emptied.id) is None
        assert await session.get(Instance, busy.id) is not None
        assert await session.get(Instance, kept.id) is not None
