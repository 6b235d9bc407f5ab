"""Backup now and restore through the API, run by the real jobs on a real VM."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import httpx
from arq.connections import ArqRedis

from app.models import User
from app.queues import hypervisor_queue
from tests.factories import auth_headers
from tests.restore.helpers import Maker, get_backup, snap
from tests.virt import vmkit
from tests.virt.images import compare_images
from tests.virt.vmkit import MiB
from tests.worker.conftest import World
from worker.jobs import JobContext, resources
from worker.tasks.backup import run_backup
from worker.tasks.control import schedule_verifications
from worker.tasks.restore import run_restore


async def _headers(maker: Maker, world: World) -> dict[str, str]:
    async with maker() as session:
        user = await session.get(User, world.user.id)
        assert user is not None
        headers = await auth_headers(session, user)
        await session.commit()
    return headers


async def _backup_now(
    client: httpx.AsyncClient,
    ctx: JobContext,
    maker: Maker,
    world: World,
    headers: dict[str, str],
    body: dict[str, str] | None = None,
) -> tuple[dict[str, object], str]:
    r = await client.post(f"/instances/{world.instance.id}/backups", json=body, headers=headers)
    assert r.status_code == 202, r.text
    planned = r.json()
    await run_backup(ctx, str(planned["id"]))
    done = await get_backup(maker, uuid.UUID(str(planned["id"])))
    assert done.status == "completed", done.error
    return planned, done.type


async def test_backup_now_then_restore_through_the_api(
    world: World,
    worker_ctx: JobContext,
    real_sessionmaker: Maker,
    real_client: httpx.AsyncClient,
    arq_redis: ArqRedis,
    tmp_path: Path,
) -> None:
    maker, vm = real_sessionmaker, world.vm
    headers = await _headers(maker, world)
    vmkit.write_pattern(vm.name, "vda", 0x61, 0, 2 * MiB)
    planned, kind = await _backup_now(real_client, worker_ctx, maker, world, headers)
    assert planned["type"] == kind == "full" and planned["manual"] is True
    vmkit.write_pattern(vm.name, "vdb", 0x62, MiB, MiB)
    expected = snap(vm, tmp_path, "inc")
    planned, kind = await _backup_now(real_client, worker_ctx, maker, world, headers)
    assert planned["type"] == kind == "incremental"
    inc_id = planned["id"]
    planned, kind = await _backup_now(
        real_client, worker_ctx, maker, world, headers, {"type": "full"}
    )
    assert planned["type"] == kind == "full"

    r = await real_client.post(
        f"/backups/{inc_id}/restore", json={"target": "new_disk"}, headers=headers
    )
    assert r.status_code == 202, r.text
    restore_id = r.json()["id"]
    queue = hypervisor_queue(world.hypervisor.id)
    assert await arq_redis.zscore(queue, f"restore:{restore_id}") is not None
    assert await run_restore(worker_ctx, restore_id) == "completed new_disk"
    assert await run_restore(worker_ctx, restore_id) == "not pending"  # arq may run it twice
    done = (await real_client.get(f"/restores/{restore_id}", headers=headers)).json()
    assert done["status"] == "completed" and done["progress"] == 100, done
    for target in ("vda", "vdb"):
        assert compare_images(Path(done["result"][target]), expected[target]), target

    # The periodic verifier picks the newest backup of the instance once it is due.
    res = resources(worker_ctx)
    settings = res.settings.model_copy(update={"verify_interval_hours": 24.0})
    assert await schedule_verifications(replace(res, settings=settings), datetime.now(UTC)) == 1
    newest = planned["id"]
    assert await arq_redis.zscore(queue, f"verify:{newest}") is not None
