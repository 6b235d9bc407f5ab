"""What the backup engine and the deletion job do when the storage is full or unreachable,
and what the reaper does with work whose worker vanished."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from arq import Retry
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import virt
from app.engine.lifecycle import NEVER_STARTED, WORKER_LOST, reap_stale
from app.models import Backup, BackupFile, BackupPolicy
from app.storage import BackupStorageDriver, get_driver
from tests.factories import (
    auth_headers,
    create_admin,
    create_backup,
    create_instance,
    create_user,
)
from tests.storage import servers
from tests.storage.conftest import mounted_tmpfs
from tests.storage.servers import Server, free_port
from tests.virt import vmkit
from tests.virt.images import job_running
from tests.virt.vmkit import MiB
from tests.worker.conftest import World
from worker.jobs import JobContext
from worker.tasks.backup import run_backup
from worker.tasks.deletion import delete_backup_files

Maker = async_sessionmaker[AsyncSession]


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
        await world.point_storage(real_sessionmaker, "local", {"path": str(small)}, {})
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
    await world.point_storage(
        real_sessionmaker,
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
    await world.point_storage(
        real_sessionmaker,
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
    await world.point_storage(real_sessionmaker, "local", local_config, {})
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


# --- the storage server killed mid-stream ---------------------------------------------------


@pytest.fixture
def doomed_rclone() -> Iterator[Server]:
    """An rclone S3 server of this test alone: it is killed and started again."""
    server = servers.start_rclone_s3()
    yield server
    server.stop()


class Killer:
    """Kills `server` (SIGKILL, from a thread, so whatever the event loop is doing) as soon as
    `begun()` sees the upload under way; with `restart_after`, starts it again on the same
    port and data that many seconds later."""

    def __init__(
        self, server: Server, begun: Callable[[], bool], restart_after: float | None = None
    ) -> None:
        self.server, self.begun, self.restart_after = server, begun, restart_after
        self.killed_at: float | None = None
        self.restarted_at: float | None = None
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + 30
        while not self.begun():
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)
        self.server.kill()
        self.killed_at = time.monotonic()
        if self.restart_after is not None:
            time.sleep(self.restart_after)
            self.server.restart()
            self.restarted_at = time.monotonic()

    def join(self) -> float:
        self._thread.join()
        assert self.killed_at is not None, "the upload was never seen under way: nothing killed"
        return self.killed_at


def _rclone_part_stored(bucket_dir: Path) -> bool:
    """rclone keeps a multipart upload in a temp file beside its key: a first part is in."""
    return any(p.stat().st_size >= 5 * MiB for p in bucket_dir.rglob(".rclone_temp_multipart_*"))


def _stored_under(root: Path, backup_id: uuid.UUID) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file() and str(backup_id) in str(p))


def _assert_failed_and_cleaned(world: World, backup: Backup, forbidden: list[str]) -> None:
    """Failed in words that name no place, with no checkpoint, job or scratch file left."""
    assert backup.status == "failed"
    assert backup.error == "Backup storage is unreachable", backup.error_detail
    for word in forbidden:
        assert word not in backup.error
    assert backup.error_detail is not None
    assert backup.error_detail.startswith("Backup storage is unreachable: ")
    uri, domain = world.vm.uri, world.vm.name
    assert f"ibp-{backup.id}" not in virt.list_checkpoints(uri, domain)
    assert not job_running(uri, domain)
    assert not list(Path(world.hypervisor.scratch_dir).iterdir())


async def _assert_next_full_completes(
    ctx: JobContext, maker: Maker, world: World, driver: BackupStorageDriver
) -> None:
    again = await _run_full(ctx, maker, world)
    assert (again.status, again.type, again.error) == ("completed", "full", None)
    keys = [o.key for o in await driver.list(f"{world.instance.id}/")]
    assert {k.rsplit("/", 1)[1] for k in keys if str(again.id) in k} == {
        "vda.qcow2",
        "vdb.qcow2",
        "manifest.json",
    }
    assert f"ibp-{again.id}" in virt.list_checkpoints(world.vm.uri, world.vm.name)


async def test_s3_server_killed_mid_stream_leaves_no_object_nor_open_upload(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker, doomed_rclone: Server
) -> None:
    server = doomed_rclone
    vmkit.write_pattern(world.vm.name, "vda", 0x5A, 0, 60 * MiB)  # 12 parts of 5 MiB
    vmkit.write_pattern(world.vm.name, "vdb", 0xA5, 0, 30 * MiB)
    config = {k: v for k, v in server.config.items() if k != "secret_access_key"}
    secret = {"secret_access_key": server.config["secret_access_key"]}
    await world.point_storage(real_sessionmaker, "s3", config, secret)
    bucket = server.config["bucket"]
    bucket_dir = server.data_dir / bucket
    # botocore gives up on a part after 4 attempts (jittered backoff of at most 1 + 2 + 4 s):
    # by 8 s the upload has failed and the driver is retrying its abort (ABORT_RETRY_DELAYS,
    # 15.5 s of pauses): the server is back within that window, on the same port and data.
    killer = Killer(server, lambda: _rclone_part_stored(bucket_dir), restart_after=8)
    started = time.monotonic()
    backup = await _run_full(worker_ctx, real_sessionmaker, world)
    ended = time.monotonic()
    killed = killer.join()
    assert killer.restarted_at is not None
    # Failed once a retried abort reached the server again, not when the retries ran out.
    assert 0 < ended - killer.restarted_at < 10, ended - killer.restarted_at
    host, port = "127.0.0.1", str(server.port)
    _assert_failed_and_cleaned(world, backup, [host, port, bucket, "http"])
    assert f"{host}:{port}" in (backup.error_detail or "")

    driver = get_driver("s3", server.config)
    try:
        # Nothing under the backup's prefix, and no unfinished upload through the S3 API.
        prefix = f"{world.instance.id}/"
        assert [o.key for o in await driver.list(prefix) if str(backup.id) in o.key] == []
        assert await driver.partial_uploads(prefix) == []
        # rclone keeps uploads in memory: the restarted server no longer knows the killed
        # one, answers the retried abort NoSuchUpload (the driver's "already gone") and
        # keeps the parts it had received in a hidden temp file the S3 API never shows.
        # A real S3 keeps the upload through an outage and the retried abort removes it
        # (tests/storage/test_s3.py: the abort retried through a cut link on moto).
        left = _stored_under(bucket_dir, backup.id)
        assert all(name.startswith(".rclone_temp_multipart_") for name in left), left
        await _assert_next_full_completes(worker_ctx, real_sessionmaker, world, driver)
    finally:
        await driver.close()
    print(f"killed {killed - started:.1f} s in, failed {ended - killed:.1f} s later; left {left}")


@pytest.fixture
def doomed_sshd() -> Iterator[Server]:
    """An OpenSSH server of this test alone: it is killed and started again."""
    server = servers.start_sshd()
    yield server
    server.stop()


def _temp_written(root: Path) -> bool:
    return any(p.stat().st_size >= 8 * MiB for p in root.rglob("*.part-*"))


async def test_sftp_server_killed_mid_stream_leaves_no_temp_file_nor_object(
    world: World, worker_ctx: JobContext, real_sessionmaker: Maker, doomed_sshd: Server
) -> None:
    server = doomed_sshd
    vmkit.write_pattern(world.vm.name, "vda", 0x5A, 0, 60 * MiB)
    vmkit.write_pattern(world.vm.name, "vdb", 0xA5, 0, 30 * MiB)
    config = {k: v for k, v in server.config.items() if k != "private_key"}
    secret = {"private_key": server.config["private_key"]}
    await world.point_storage(real_sessionmaker, "sftp", config, secret)
    # sshd and every session it forked are killed once a temp file holds 8 MiB, and sshd is
    # back 2 s later on the same port, host key and files.
    killer = Killer(server, lambda: _temp_written(server.data_dir), restart_after=2)
    started = time.monotonic()
    backup = await _run_full(worker_ctx, real_sessionmaker, world)
    ended = time.monotonic()
    killed = killer.join()
    assert killer.restarted_at is not None
    # The driver removed its temp file on a new connection once sshd was back (its retries
    # at 0, 0.5, 1.5 and 3.5 s after the loss), then the job failed.
    assert 2 < ended - killed < 10, ended - killed
    host, port = "127.0.0.1", str(server.port)
    _assert_failed_and_cleaned(world, backup, [host, port, "/upload", server.config["username"]])
    assert f"{host}:{port}" in (backup.error_detail or "")
    assert _stored_under(server.data_dir, backup.id) == []

    driver = get_driver("sftp", server.config)
    try:
        prefix = f"{world.instance.id}/"
        assert [o.key for o in await driver.list(prefix) if str(backup.id) in o.key] == []
        assert await driver.partial_uploads(prefix) == []
        await _assert_next_full_completes(worker_ctx, real_sessionmaker, world, driver)
    finally:
        await driver.close()
    print(f"killed {killed - started:.1f} s in, failed {ended - killed:.1f} s later")
