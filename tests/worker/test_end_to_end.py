"""End to end: a policy attached to a running VM, the tick dispatches at the scheduled minute,
the hypervisor's arq worker takes the backup, and the API lists it completed."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
from arq.connections import ArqRedis
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.main import create_app
from app.models import BackupPolicy
from tests.factories import auth_headers
from tests.worker.conftest import World
from worker.main import _workers
from worker.tasks.tick import run_tick


async def test_scheduled_backup_runs_through_the_worker_and_shows_in_the_api(
    world: World,
    real_sessionmaker: async_sessionmaker[AsyncSession],
    arq_redis: ArqRedis,
    settings: Settings,
) -> None:
    due = datetime(2026, 7, 1, 0, tzinfo=UTC)  # 02:00 in Paris (summer time)
    async with real_sessionmaker() as session:
        await session.execute(
            update(BackupPolicy)
            .where(BackupPolicy.id == world.policy.id)
            .values(next_run_at=due, next_check_at=due)
        )
        headers = await auth_headers(session, world.user)
        await session.commit()

    early = await run_tick(
        real_sessionmaker, arq_redis, due - timedelta(minutes=1), timedelta(hours=6)
    )
    assert not early.dispatched
    result = await run_tick(real_sessionmaker, arq_redis, due, timedelta(hours=6))
    assert len(result.dispatched) == 1

    ((queue, make),) = _workers(settings, world.hypervisor, control=False, worker_id=uuid.uuid4())
    hv_worker = make()
    assert hv_worker.queue_name == queue
    hv_worker.burst = True
    await hv_worker.main()
    await hv_worker.close()

    app = create_app(settings)
    app.state.sessionmaker = real_sessionmaker
    app.state.arq = arq_redis
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t/api/v1") as client:
        r = await client.get(f"/backup-policies/{world.policy.id}/backups", headers=headers)
        assert r.status_code == 200, r.text
        (backup,) = r.json()["items"]
        assert backup["status"] == "completed", backup["error"]
        assert backup["type"] == "full"
        assert backup["size_bytes"] > 0 and backup["size_human"].endswith(("KB", "MB"))
        assert backup["scheduled_for"].startswith("2026-07-01T00:00:00")
        assert {f["disk"] for f in backup["files"]} == {"vda", "vdb"}
        assert backup["monthly_cost"] is not None
        policy = (await client.get(f"/backup-policies/{world.policy.id}", headers=headers)).json()
        assert policy["status"] == "active"
        assert policy["next_run_at"].startswith("2026-07-02T00:00:00")
