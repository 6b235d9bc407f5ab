"""The worker's metrics move where the events happen: a real backup job and a restore of it
(real VM, libvirt and local storage), a failed backup, a failed restore, the scheduler tick
and a storage check; and a worker serves them on its own port (`ibp worker --metrics-port`)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.models import Backup, BackupFile, BackupStorage
from tests.factories import (
    create_backup,
    create_chain,
    create_hypervisor,
    create_instance,
    create_policy,
    create_restore,
    create_user,
)
from tests.worker.conftest import World, local_storage
from worker.jobs import JobContext
from worker.main import metrics_server
from worker.tasks.backup import run_backup
from worker.tasks.check import check_storage
from worker.tasks.control import tick
from worker.tasks.restore import run_restore

Maker = async_sessionmaker[AsyncSession]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def snapshot(*names: tuple[str, dict[str, str]]) -> dict[str, float]:
    return {f"{n}{sorted(labels.items())}": sample(n, **labels) for n, labels in names}


async def _pending_backup(maker: Maker, world: World) -> uuid.UUID:
    now = datetime.now(UTC)
    async with maker() as session:
        backup = Backup(
            id=uuid.uuid4(),
            instance_id=world.instance.id,
            policy_id=world.policy.id,
            type="full",
            status="pending",
            scheduled_for=now,
            created_at=now,
            backup_device=world.policy.backup_device,
        )
        session.add(backup)
        await session.commit()
        return backup.id


async def test_a_backup_job_moves_the_backup_metrics_and_the_api_gauges(
    world: World,
    worker_ctx: JobContext,
    real_sessionmaker: Maker,
    real_client: httpx.AsyncClient,
) -> None:
    full = {"type": "full"}
    done = {"type": "full", "status": "completed"}
    before = {
        "total": sample("ibp_backups_total", **done),
        "duration": sample("ibp_backup_duration_seconds_count", **done),
        "size_count": sample("ibp_backup_size_bytes_count", **full),
        "size_sum": sample("ibp_backup_size_bytes_sum", **full),
        "rate": sample("ibp_backup_throughput_bytes_per_second_count", **full),
    }
    backup_id = await _pending_backup(real_sessionmaker, world)

    assert await run_backup(worker_ctx, str(backup_id)) == "completed full"

    async with real_sessionmaker() as session:
        backup = await session.get(Backup, backup_id)
        assert backup is not None and backup.size_bytes
    assert sample("ibp_backups_total", **done) == before["total"] + 1
    assert sample("ibp_backup_duration_seconds_count", **done) == before["duration"] + 1
    assert sample("ibp_backup_size_bytes_count", **full) == before["size_count"] + 1
    assert sample("ibp_backup_size_bytes_sum", **full) == before["size_sum"] + backup.size_bytes
    assert sample("ibp_backup_throughput_bytes_per_second_count", **full) == before["rate"] + 1

    # A restore of it moves the restore metrics by the chain's bytes.
    restored = {"target": "new_disk", "status": "completed"}
    restores_before = sample("ibp_restores_total", **restored)
    read_before = sample("ibp_restore_size_bytes_sum", target="new_disk")
    async with real_sessionmaker() as session:
        restore = await create_restore(
            session, world.instance, backup_id=backup_id, status="pending", target="new_disk"
        )
        await session.commit()
    assert await run_restore(worker_ctx, str(restore.id)) == "completed new_disk"
    assert sample("ibp_restores_total", **restored) == restores_before + 1
    assert (
        sample("ibp_restore_size_bytes_sum", target="new_disk") == read_before + backup.size_bytes
    )

    # The API reads the outcome from PostgreSQL: the policy's instance was just backed up.
    text = (await real_client.get("http://test/metrics")).text
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    age = values[("ibp_policy_oldest_good_backup_age_seconds", (("policy", str(world.policy.id)),))]
    assert 0 <= age < 600
    hv = world.hypervisor.name
    assert values[("ibp_jobs_running", (("hypervisor", hv), ("kind", "backup")))] == 0
    assert str(backup_id) not in text and str(world.instance.id) not in text

    # The worker's own port serves the same counters.
    with metrics_server("127.0.0.1", 0) as port:
        served = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(served)}
    counted = [s for s in families["ibp_backups"].samples if s.labels == done]
    assert counted and counted[0].value == sample("ibp_backups_total", **done)
    assert str(backup_id) not in served


async def test_a_failed_backup_and_a_failed_restore_are_counted_by_type(
    worker_ctx: JobContext, real_sessionmaker: Maker, tmp_path: Path
) -> None:
    failed_backup = {"type": "incremental", "status": "failed"}
    failed_restore = {"target": "new_disk", "status": "failed"}
    before = snapshot(
        ("ibp_backups_total", failed_backup),
        ("ibp_backup_duration_seconds_count", failed_backup),
        ("ibp_backup_size_bytes_count", {"type": "incremental"}),
        ("ibp_restores_total", failed_restore),
    )
    storage = local_storage(tmp_path)
    async with real_sessionmaker() as session:
        owner = await create_user(session)
        # No backup storage on the hypervisor: the backup job fails at once.
        bare = await create_hypervisor(session, backup_storage_id=None)
        instance = await create_instance(session, owner, hypervisor_id=bare.id)
        backup = await create_backup(
            session, instance, type="incremental", status="pending", completed_at=None
        )
        # A restore of a whole chain on a hypervisor with no such VM: fails at libvirt.
        session.add(storage)
        await session.flush()
        chain = await create_chain(session, instance, storage_id=storage.id)
        stored = await create_backup(
            session,
            instance,
            chain_id=chain.id,
            storage_id=storage.id,
            scheduled_for=datetime.now(UTC) - timedelta(days=1),
        )
        session.add(
            BackupFile(
                id=uuid.uuid4(),
                backup_id=stored.id,
                disk_target="vda",
                object_key=f"{instance.id}/{chain.id}/{stored.id}/vda.qcow2",
                size_bytes=1,
                sha256=hashlib.sha256(b"x").hexdigest(),
            )
        )
        restore = await create_restore(
            session, instance, backup_id=stored.id, status="pending", target="new_disk"
        )
        await session.commit()

    assert (await run_backup(worker_ctx, str(backup.id))).startswith("failed")
    assert (await run_restore(worker_ctx, str(restore.id))).startswith("failed")

    after = snapshot(
        ("ibp_backups_total", failed_backup),
        ("ibp_backup_duration_seconds_count", failed_backup),
        ("ibp_backup_size_bytes_count", {"type": "incremental"}),
        ("ibp_restores_total", failed_restore),
    )
    assert [after[k] - before[k] for k in before] == [1, 1, 0, 1]


async def test_a_tick_moves_the_scheduler_metrics(
    worker_ctx: JobContext, real_sessionmaker: Maker
) -> None:
    before = {
        "ticks": sample("ibp_scheduler_tick_duration_seconds_count"),
        "dispatched": sample("ibp_scheduler_dispatched_total"),
        "reaped": sample("ibp_scheduler_reaped_total", kind="backup"),
    }
    now = datetime.now(UTC)
    slot = now.replace(minute=0, second=0, microsecond=0)  # this hour's run: within the grace
    async with real_sessionmaker() as session:
        owner = await create_user(session, timezone="UTC")
        policy = await create_policy(session, owner, hour=slot.hour, next_run_at=slot)
        await create_instance(session, owner, backup_policy_id=policy.id)
        # A backup whose worker went silent an hour ago: the tick fails it.
        lost = await create_instance(session, owner)
        await create_backup(
            session,
            lost,
            status="in_progress",
            completed_at=None,
            heartbeat_at=now - timedelta(hours=1),
            scheduled_for=now - timedelta(hours=1),
        )
        await session.commit()

    result = await tick(worker_ctx)

    assert "dispatched=1" in result, result
    assert sample("ibp_scheduler_tick_duration_seconds_count") == before["ticks"] + 1
    assert sample("ibp_scheduler_dispatched_total") == before["dispatched"] + 1
    assert sample("ibp_scheduler_reaped_total", kind="backup") == before["reaped"] + 1


async def test_a_storage_check_counts_its_result(
    worker_ctx: JobContext, real_sessionmaker: Maker, tmp_path: Path
) -> None:
    ok, error = {"kind": "local", "result": "ok"}, {"kind": "local", "result": "error"}
    before = snapshot(("ibp_storage_checks_total", ok), ("ibp_storage_checks_total", error))
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("not a directory")
    good, bad = local_storage(tmp_path / "store"), local_storage(not_a_dir)
    (tmp_path / "store").mkdir()
    async with real_sessionmaker() as session:
        for storage in (good, bad):
            storage.status = "checking"
            session.add(storage)
        await session.commit()

    assert await check_storage(worker_ctx, str(good.id)) == "ok"
    assert (await check_storage(worker_ctx, str(bad.id))).startswith("failed")

    after = snapshot(("ibp_storage_checks_total", ok), ("ibp_storage_checks_total", error))
    assert [after[k] - before[k] for k in before] == [1, 1]
    async with real_sessionmaker() as session:
        assert (await session.get(BackupStorage, good.id)).status == "ok"  # type: ignore[union-attr]


def test_a_taken_metrics_port_is_one_clear_line() -> None:
    with metrics_server("127.0.0.1", 0) as port:
        assert port is not None
        with pytest.raises(SystemExit) as stopped, metrics_server("127.0.0.1", port):
            pass
    assert str(stopped.value) == (
        f"ibp worker: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    )
