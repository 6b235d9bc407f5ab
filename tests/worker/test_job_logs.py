"""A job's log lines as an operator reads them in JSON: every line a backup, restore or verify
logs carries its ids, a long transfer logs its progress, and no storage secret ever shows, even
at DEBUG with every library's lines, whether the job succeeds or its login is refused."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import logs
from app.logs import setup_logging
from app.models import Backup
from tests.restore.helpers import restore, take_backup, verify
from tests.storage import servers
from tests.storage.conftest import rclone_server, sshd_server  # noqa: F401  (fixtures)
from tests.storage.servers import Server
from tests.virt import vmkit
from tests.virt.vmkit import MiB
from tests.worker.conftest import World
from worker.jobs import JobContext
from worker.tasks.deletion import delete_backup_files

Maker = async_sessionmaker[AsyncSession]
# The FTP password of this module's server: it must never be in a log line.
MARKER = f"ftp-marker-{uuid.uuid4().hex}"
Lines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def json_logs() -> Iterator[tuple[io.StringIO, Lines]]:
    """Every line of every logger at DEBUG, in JSON, as `ibp worker` writes them; the raw
    text, and a function parsing what was logged since the last call."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    setup_logging("json", "DEBUG", out)
    read = [0]

    def lines() -> list[dict[str, Any]]:
        text = out.getvalue()
        new, read[0] = text[read[0] :], len(text)
        return [json.loads(line) for line in new.splitlines()]

    try:
        yield out, lines
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture(scope="module")
def marked_ftp() -> Iterator[Server]:
    try:
        server = servers.start_ftp(password=MARKER)
    except servers.ServerStartError as exc:
        pytest.fail(f"cannot start the FTP server: {exc}", pytrace=False)
    yield server
    server.stop()


def _ids(world: World) -> dict[str, str]:
    return {
        "instance_id": str(world.instance.id),
        "policy_id": str(world.policy.id),
        "hypervisor_id": str(world.hypervisor.id),
    }


def _carry(lines: list[dict[str, Any]], ids: dict[str, str]) -> None:
    """Every line carries the job's ids (the job runs alone: each line is its own)."""
    assert lines
    for line in lines:
        assert line.items() >= ids.items(), line


async def test_every_line_of_a_backup_restore_verify_and_deletion_carries_their_ids(
    world: World,
    worker_ctx: JobContext,
    real_sessionmaker: Maker,
    json_logs: tuple[io.StringIO, Lines],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, lines = json_logs
    monkeypatch.setattr(logs, "PROGRESS_EVERY_S", 0.0)  # a progress line at every advance
    vmkit.write_pattern(world.vm.name, "vda", 0x5A, 0, 16 * MiB)
    lines()

    backup = await take_backup(worker_ctx, real_sessionmaker, world, "full")
    assert backup.status == "completed", backup.error_detail
    logged = lines()
    _carry(logged, {**_ids(world), "job": "backup", "backup_id": str(backup.id)})
    messages = [line["message"] for line in logged]
    assert f"backup {backup.id} started" in messages
    assert any(m.startswith(f"backup {backup.id} completed full in ") for m in messages)
    progress = [line for line in logged if line["message"].startswith("backup progress: ")]
    assert progress and progress[-1]["bytes_done"] == progress[-1]["bytes_total"] > 16 * MiB
    assert {"rate_mb_s", "eta_s"} <= progress[-1].keys()

    done = await restore(worker_ctx, real_sessionmaker, world, backup.id, "new_disk")
    assert done.status == "completed", done.error_detail
    logged = lines()
    _carry(logged, {**_ids(world), "job": "restore", "restore_id": str(done.id)})
    assert any(line["message"].startswith("restore progress: ") for line in logged)

    checked = await verify(worker_ctx, real_sessionmaker, backup.id)
    assert checked.verify_ok, checked.verify_error_detail
    _carry(lines(), {**_ids(world), "job": "verify", "backup_id": str(backup.id)})

    async with real_sessionmaker() as session:
        await session.execute(
            update(Backup).where(Backup.id == backup.id).values(status="deleting")
        )
        await session.commit()
    assert await delete_backup_files(worker_ctx, str(backup.id)) == "deleted"
    _carry(lines(), {**_ids(world), "job": "delete", "backup_id": str(backup.id)})


async def _point_storage(maker: Maker, world: World, kind: str, config: dict[str, Any]) -> None:
    """`config` with its secrets in it, as a test server gives it."""
    secrets = {k: config.pop(k, None) for k in ("password", "secret_access_key", "private_key")}
    await world.point_storage(maker, kind, config, {k: v for k, v in secrets.items() if v})


@pytest.mark.parametrize("kind", ["ftp", "sftp", "s3"])
async def test_no_storage_secret_is_logged_by_a_backup_that_succeeds_or_is_refused(
    kind: str,
    world: World,
    worker_ctx: JobContext,
    real_sessionmaker: Maker,
    json_logs: tuple[io.StringIO, Lines],
    request: pytest.FixtureRequest,
) -> None:
    raw, lines = json_logs
    if kind == "ftp":
        server: Server = request.getfixturevalue("marked_ftp")
        config, secret = {**server.config, "password": MARKER}, MARKER
    elif kind == "sftp":
        server = request.getfixturevalue("sshd_server")
        secret = server.extra["password"]  # random: as unique as a marker
        config = {**server.config, "private_key": None, "password": secret}
    else:
        server = request.getfixturevalue("rclone_server")
        secret = server.config["secret_access_key"]
        config = {**server.config}
    assert len(secret) >= 16
    field = "secret_access_key" if kind == "s3" else "password"
    vmkit.write_pattern(world.vm.name, "vda", 0x3C, 0, 4 * MiB)
    lines()

    await _point_storage(real_sessionmaker, world, kind, dict(config))
    good = await take_backup(worker_ctx, real_sessionmaker, world, "full")
    assert good.status == "completed", good.error_detail
    _carry(lines(), {**_ids(world), "backup_id": str(good.id)})

    # The wrong secret holds the right one, so neither may show.
    await _point_storage(real_sessionmaker, world, kind, {**config, field: f"{secret}-wrong"})
    bad = await take_backup(worker_ctx, real_sessionmaker, world, "full")
    assert bad.status == "failed" and bad.error == "Backup storage is unreachable", bad
    logged = lines()
    _carry(logged, {**_ids(world), "backup_id": str(bad.id)})
    assert any(
        line["level"] == "WARNING" and line["message"].startswith(f"backup {bad.id} failed: ")
        for line in logged
    )

    assert secret not in raw.getvalue()
    assert secret not in (bad.error_detail or "")
