"""Work on a hypervisor whose worker is gone fails in minutes, saying so: not after hours."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.engine.workers import GONE_AFTER, NO_WORKER, WORKER_GONE, fail_unattended, register
from app.models import Hypervisor, Instance
from tests.factories import create_backup, create_instance, create_user

Maker = async_sessionmaker[AsyncSession]


async def test_work_without_a_live_worker_fails_in_minutes_and_says_why(
    real_sessionmaker: Maker,
) -> None:
    now = datetime.now(UTC)
    later = now + GONE_AFTER + timedelta(seconds=30)
    async with real_sessionmaker() as session:
        owner = await create_user(session)
        served, unserved, dead = [await create_instance(session, owner) for _ in range(3)]
        names = dict(
            (await session.execute(select(Instance.id, Hypervisor.name).join(Hypervisor))).all()
        )
        # A worker that keeps beating serves `served`'s hypervisor; `dead`'s worker died now.
        live_worker = await register(session, served.hypervisor_id, "h1", 1, later, lambda _: True)
        dead_worker = await register(session, dead.hypervisor_id, "h2", 2, now, lambda _: True)
        waiting = await create_backup(
            session, served, status="pending", created_at=now, completed_at=None
        )
        stranded = await create_backup(
            session, unserved, status="pending", created_at=now, completed_at=None
        )
        fresh = await create_backup(
            session, unserved, status="pending", created_at=later, completed_at=None
        )
        running = await create_backup(
            session,
            served,
            status="in_progress",
            completed_at=None,
            heartbeat_at=later,
            worker_id=live_worker,
        )
        orphan = await create_backup(
            session,
            dead,
            status="in_progress",
            completed_at=None,
            heartbeat_at=now,
            worker_id=dead_worker,
        )
        # Without a worker id (`ibp run-backup`, or claimed before the upgrade): its heartbeat.
        beating = await create_backup(
            session, served, status="in_progress", completed_at=None, heartbeat_at=later
        )
        silent = await create_backup(
            session, served, status="in_progress", completed_at=None, heartbeat_at=now
        )
        await session.commit()
        failed = {row.id for row in await fail_unattended(session, later)}
        await session.commit()
        assert failed == {stranded.id, orphan.id, silent.id}
        stranded_words = (NO_WORKER, f"No worker is running for hypervisor {names[unserved.id]}")
        for backup, status, (error, detail) in (
            (waiting, "pending", (None, None)),
            (stranded, "failed", stranded_words),
            (fresh, "pending", (None, None)),
            (running, "in_progress", (None, None)),
            (orphan, "failed", (WORKER_GONE, None)),
            (beating, "in_progress", (None, None)),
            (silent, "failed", (WORKER_GONE, None)),
        ):
            await session.refresh(backup)
            assert (backup.status, backup.error, backup.error_detail) == (status, error, detail)
