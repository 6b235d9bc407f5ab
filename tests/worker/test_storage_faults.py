"""What the backup engine and the deletion job do when the storage is full or unreachable,
and what the reaper does with work whose worker vanished."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from arq import Retry
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.engine.lifecycle import NEVER_STARTED, WORKER_LOST, reap_stale
from app.models import Backup, BackupFile, BackupPolicy, BackupStorage
from app.security import secret_box
from tests.factories import (
    auth_headers,
    create_admin,
    create_backup,
    create_instance,
    create_user,
)
from tests.storage.conftest import mounted_tmpfs
from tests.storage.servers import free_port
from tests.virt import vmkit
from tests.virt.vmkit import MiB
from tests.worker.conftest import World
from worker.jobs import JobContext
from worker.tasks.backup import run_backup
from worker.tasks.deletion import delete_backup_files

Maker = async_sessionmaker[AsyncSession]


async def _point_storage(
    maker: Maker, world: World, kind: str, config: dict, secrets: dict
) -> None:  # type: ignore[type-arg]
    async with maker() as session:
        await session.execute(
            update(BackupStorage)
            .where(BackupStorage.id == world.storage.id)
            .values(
                kind=kind,
                config=config,
                secrets_encrypted=secret_box().encrypt(secrets) if secrets else None,
            )
        )
        await session.commit()


async def _run_full(ctx: JobContext, maker: Maker, world: World) -> Backup:
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
            backup_device="all",
        )
        session.add(backup)
        await session.commit()
    await run_backup(ctx, str(backup.id))
    async with maker() as session:
        done = await session.get(Backup, backup.id)
        assert done is not None
        return done


async def test_backup_to_a_full_storage_fails_with_the_spec_wording_and_leaves_nothing(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker
) -> None:
    vmkit.write_pattern(world.vm.name, "vda", 0x5A, 0, 24 * MiB)
    with mounted_tmpfs("4m") as small:
        await _point_storage(real_sessionmaker, world, "local", {"path": str(small)}, {})
        backup = await _run_full(worker_ctx, real_sessionmaker, world)
        assert backup.status == "failed"
        assert backup.error == "Backup storage is full"
        # 24 MiB of data (plus the OS image's) cannot go into a 4 MiB filesystem: the
        # operator reads how much was needed and how much was free.
        assert re.fullmatch(
            r"Backup storage is full: about \d+\.\d MB needed, \d+\.\d (KB|MB) free",
            backup.error_detail or "",
        ), backup.error_detail
        assert [p for p in small.rglob("*") if p.is_file()] == []
    async with real_sessionmaker() as session:
        policy = await session.get(BackupPolicy, world.policy.id)
        assert policy is not None and policy.status == "error"
        assert policy.last_error is not None and backup.error is not None
        assert policy.last_error.endswith(backup.error)
    assert not list(Path(world.hypervisor.scratch_dir).glob("*"))


async def test_backup_to_an_unreachable_storage_says_why_in_two_views(
    world: World,
    worker_ctx: JobContext,
    real_sessionmaker: Maker,
    real_client: httpx.AsyncClient,
) -> None:
    port = free_port()  # nothing listens there
    await _point_storage(
        real_sessionmaker,
        world,
        "ftp",
        {"host": "127.0.0.1", "port": port, "username": "backup", "path": "/", "tls": False},
        {"password": "x"},
    )
    backup = await _run_full(worker_ctx, real_sessionmaker, world)
    assert backup.status == "failed"
    # Two views: the owner is told what happened, an admin also where.
    assert backup.error == "Backup storage is unreachable"
    assert backup.error_detail is not None
    assert backup.error_detail.startswith("Backup storage is unreachable: ")
    assert "127.0.0.1" in backup.error_detail and str(port) in backup.error_detail
    async with real_sessionmaker() as session:
        owner = await auth_headers(session, world.user)
        admin = await auth_headers(session, await create_admin(session))
        policy = await session.get(BackupPolicy, world.policy.id)
        await session.commit()
    assert policy is not None and policy.last_error == f"{world.instance.name}: {backup.error}"
    client = real_client
    mine = (await client.get(f"/backups/{backup.id}", headers=owner)).json()
    theirs = (await client.get(f"/backups/{backup.id}", headers=admin)).json()
    listed = (await client.get(f"/instances/{world.instance.id}/backups", headers=owner)).json()
    assert (mine["error"], mine["error_detail"]) == ("Backup storage is unreachable", None)
    assert listed["items"][0]["error_detail"] is None
    assert "127.0.0.1" not in str(mine) and str(port) not in str(mine)
    assert (theirs["error"], theirs["error_detail"]) == (backup.error, backup.error_detail)


async def test_deletion_keeps_the_row_and_retries_while_storage_is_unreachable(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker
) -> None:
    backup = await _run_full(worker_ctx, real_sessionmaker, world)
    assert backup.status == "completed", backup.error
    async with real_sessionmaker() as session:
        await session.execute(
            update(Backup).where(Backup.id == backup.id).values(status="deleting")
        )
        await session.commit()
    local_config = {"path": str(world.storage_dir)}
    await _point_storage(
        real_sessionmaker,
        world,
        "ftp",
        {"host": "127.0.0.1", "port": free_port(), "username": "b", "path": "/", "tls": False},
        {"password": "x"},
    )
    with pytest.raises(Retry):
        await delete_backup_files(worker_ctx, str(backup.id))
    async with real_sessionmaker() as session:
        row = await session.get(Backup, backup.id)
        assert row is not None and row.status == "deleting" and row.delete_attempts == 1
        assert (row.delete_error or "").startswith("Backup storage is unreachable")
    stored = list(world.storage_dir.rglob("*.qcow2"))
    assert stored, "the files must stay while the rows do"

    # The storage is back: the retry removes files first, then the rows.
    await _point_storage(real_sessionmaker, world, "local", local_config, {})
    assert await delete_backup_files(worker_ctx, str(backup.id)) == "deleted"
    assert not list(world.storage_dir.rglob("*.qcow2"))
    async with real_sessionmaker() as session:
        assert await session.get(Backup, backup.id) is None
        files = await session.scalars(select(BackupFile).where(BackupFile.backup_id == backup.id))
        assert files.all() == []


async def test_reaper_fails_backups_whose_worker_vanished(
    real_sessionmaker: Maker,
) -> None:
    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    async with real_sessionmaker() as session:
        owner = await create_user(session)
        a = await create_instance(session, owner)
        b = await create_instance(session, owner)
        c = await create_instance(session, owner)
        lost = await create_backup(
            session,
            a,
            status="in_progress",
            heartbeat_at=now - timedelta(minutes=16),
            completed_at=None,
        )
        alive = await create_backup(
            session,
            b,
            status="in_progress",
            heartbeat_at=now - timedelta(minutes=2),
            completed_at=None,
        )
        never = await create_backup(
            session, c, status="pending", created_at=now - timedelta(hours=7), completed_at=None
        )
        await session.commit()
        reaped = await reap_stale(session, now, timedelta(minutes=15), timedelta(hours=6))
        await session.commit()
        assert set(reaped) == {lost.id, never.id}
        for backup, status, error in (
            (lost, "failed", WORKER_LOST),
            (alive, "in_progress", None),
            (never, "failed", NEVER_STARTED),
        ):
            await session.refresh(backup)
            assert (backup.status, backup.error) == (status, error)
