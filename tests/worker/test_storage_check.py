"""Storage checks run as a job on a hypervisor's worker, and stored secrets never follow a
storage to a new host: a real pyftpdlib server on loopback records every login it receives."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.models import BackupStorage, Hypervisor, Worker
from app.security import SecretBox, secret_box
from tests.factories import auth_headers, create_admin, create_location
from tests.storage import servers
from tests.storage.servers import Server
from worker import main as worker_main
from worker.jobs import JobContext
from worker.tasks import check

OLD_PASSWORD, NEW_PASSWORD = "old-password-never-to-travel", "new-password-for-the-new-host"


@pytest.fixture
def recording_ftp() -> Iterator[Server]:
    server = servers.start_ftp(password=NEW_PASSWORD, record=True)
    yield server
    server.stop()


async def _ftp_storage_on_a_served_hypervisor(
    session: AsyncSession, config: dict[str, Any], secrets: dict[str, Any], box: SecretBox
) -> tuple[BackupStorage, Hypervisor]:
    storage = BackupStorage(
        id=uuid.uuid4(),
        name=f"ftp-{uuid.uuid4().hex[:6]}",
        kind="ftp",
        config=config,
        secrets_encrypted=box.encrypt(secrets),
        status="unknown",
    )
    session.add(storage)
    await session.flush()
    location = await create_location(session)
    hypervisor = Hypervisor(
        id=uuid.uuid4(),
        name=f"hv-{uuid.uuid4().hex[:6]}",
        location_id=location.id,
        backup_storage_id=storage.id,
    )
    session.add(hypervisor)
    await session.flush()
    now = datetime.now(UTC)
    live = Worker(id=uuid.uuid4(), hypervisor_id=hypervisor.id, host="hv", pid=1, started_at=now)
    live.seen_at = now
    session.add(live)
    await session.flush()
    return storage, hypervisor


async def _serve_queue_once(settings: Settings, hypervisor: Hypervisor) -> None:
    """The hypervisor's real arq worker, in burst mode: it runs what is queued, then stops."""
    ((_, make),) = worker_main._workers(settings, hypervisor, control=False, worker_id=uuid.uuid4())
    hv_worker = make()
    hv_worker.burst = True
    await hv_worker.main()
    await hv_worker.close()


def _ftp_config(host: str, port: int) -> dict[str, Any]:
    return {"host": host, "port": port, "username": servers.FTP_USER, "path": "/", "tls": False}


async def test_the_new_host_gets_the_new_password_never_the_stored_one(
    real_client: httpx.AsyncClient,
    real_sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
    recording_ftp: Server,
) -> None:
    async with real_sessionmaker() as session:
        headers = await auth_headers(session, await create_admin(session))
        storage, hypervisor = await _ftp_storage_on_a_served_hypervisor(
            session,
            _ftp_config("ftp-old.example.invalid", recording_ftp.port),
            {"password": OLD_PASSWORD},
            secret_box(),
        )
        await session.commit()

    moved = await real_client.patch(
        f"/backup-storages/{storage.id}", json={"config": {"host": "127.0.0.1"}}, headers=headers
    )
    assert moved.status_code == 422, moved.text
    assert [e["field"] for e in moved.json()["errors"]] == ["config.password"]
    still = (await real_client.get(f"/backup-storages/{storage.id}", headers=headers)).json()
    assert still["config"]["host"] == "ftp-old.example.invalid"

    given = await real_client.patch(
        f"/backup-storages/{storage.id}",
        json={"config": {"host": "127.0.0.1", "password": NEW_PASSWORD}},
        headers=headers,
    )
    assert given.status_code == 200, given.text
    accepted = await real_client.post(f"/backup-storages/{storage.id}/check", headers=headers)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["status"] == "checking"

    await _serve_queue_once(settings, hypervisor)

    checked = (await real_client.get(f"/backup-storages/{storage.id}", headers=headers)).json()
    assert checked["status"] == "ok", checked["last_error"]
    assert checked["last_checked_at"] is not None
    logins = servers.ftp_logins(recording_ftp)
    assert logins and set(logins) == {(servers.FTP_USER, NEW_PASSWORD)}


async def _check_now(
    worker_ctx: JobContext,
    sessionmaker: async_sessionmaker[AsyncSession],
    config: dict[str, Any],
    secrets: dict[str, Any],
    box: SecretBox | None = None,
) -> BackupStorage:
    """A storage marked `checking`, its check job run, the row as the job left it."""
    async with sessionmaker() as session:
        storage, _ = await _ftp_storage_on_a_served_hypervisor(
            session, config, secrets, box or secret_box()
        )
        storage.status = "checking"
        await session.commit()
    await check.check_storage(worker_ctx, str(storage.id))
    async with sessionmaker() as session:
        row = await session.get(BackupStorage, storage.id)
        assert row is not None
        return row


async def test_a_refused_connection_is_reported_without_the_address(
    worker_ctx: JobContext, real_sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    port = servers.free_port()  # nothing listens there
    row = await _check_now(
        worker_ctx, real_sessionmaker, _ftp_config("127.0.0.1", port), {"password": "x"}
    )
    assert row.status == "error"
    assert row.last_error == "cannot connect to the storage server (connection refused)"
    assert row.last_checked_at is not None


async def test_a_refused_login_is_reported_without_what_the_server_said(
    worker_ctx: JobContext,
    real_sessionmaker: async_sessionmaker[AsyncSession],
    recording_ftp: Server,
) -> None:
    row = await _check_now(
        worker_ctx,
        real_sessionmaker,
        _ftp_config("127.0.0.1", recording_ftp.port),
        {"password": "wrong"},
    )
    assert row.status == "error"
    assert row.last_error == "cannot connect to the storage server (login refused)"


async def test_a_silent_server_fails_the_check_after_its_timeout(
    worker_ctx: JobContext,
    real_sessionmaker: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(check, "CHECK_TIMEOUT_S", 1.0)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never speaks
        silent.bind((servers.HOST, 0))
        silent.listen(8)
        started = time.monotonic()
        row = await _check_now(
            worker_ctx,
            real_sessionmaker,
            _ftp_config(servers.HOST, silent.getsockname()[1]),
            {"password": "x"},
        )
    assert time.monotonic() - started < 10
    assert row.status == "error"
    assert row.last_error == "the storage did not answer within 1 s"


async def test_secrets_sealed_with_another_key_fail_the_check_saying_so(
    worker_ctx: JobContext, real_sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    other_key = SecretBox("a-different-secret-key-of-enough-length-0123")
    row = await _check_now(
        worker_ctx,
        real_sessionmaker,
        _ftp_config("127.0.0.1", 21),
        {"password": "x"},
        box=other_key,
    )
    assert row.status == "error"
    assert row.last_error is not None
    assert f"'{row.name}' ({row.id})" in row.last_error
    assert "cannot be decrypted with the current IBP_SECRET_KEY" in row.last_error
