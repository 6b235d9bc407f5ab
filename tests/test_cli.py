"""The `ibp` command as an operator uses it, against the test database."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import libvirt
import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app import paths
from app.cli import main
from app.models import ApiToken, BackupStorage, Hypervisor, Instance, InstanceDisk, User
from app.security import token_digest
from tests.virt import vmkit


def _ibp(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_setup_local_registers_this_machine_once(
    committed_engine: AsyncEngine, tmp_path: Path
) -> None:
    for _ in range(2):
        done = _ibp("setup-local", "--data-dir", str(tmp_path))
        assert done.returncode == 0, done.stderr
    async with committed_engine.connect() as conn:
        hypervisors = await conn.scalar(
            select(func.count()).select_from(Hypervisor).where(Hypervisor.name == "local")
        )
        config = await conn.scalar(
            select(BackupStorage.config).where(BackupStorage.name == "local-disk")
        )
    assert hypervisors == 1
    assert config == {"path": str(tmp_path / "backups")}
    assert (tmp_path / "backups").is_dir() and (tmp_path / "scratch").is_dir()


def test_worker_for_an_unknown_hypervisor_says_what_to_do() -> None:
    done = _ibp("worker", "--hypervisor", "no-such-host", "--no-control")
    assert done.returncode != 0
    assert "No hypervisor named 'no-such-host'" in done.stderr
    assert "Traceback" not in done.stderr


def test_create_token_refuses_an_unknown_email() -> None:
    done = _ibp("create-token", "--email", "nobody@example.com")
    assert done.returncode != 0 and "No user with email" in done.stderr


async def test_create_token_expires_within_the_administrators_maximum(
    committed_engine: AsyncEngine,
) -> None:
    async with committed_engine.begin() as conn:
        user_id = uuid.uuid4()
        await conn.execute(
            insert(User).values(id=user_id, email="ops@example.com", name="Ops", password_hash="x")
        )
    before = datetime.now(UTC)
    done = _ibp("create-token", "--email", "ops@example.com", IBP_MAX_TOKEN_DAYS="5")
    assert done.returncode == 0, done.stderr
    async with committed_engine.connect() as conn:
        expires_at = await conn.scalar(
            select(ApiToken.expires_at).where(
                ApiToken.token_hash == token_digest(done.stdout.strip())
            )
        )
    assert expires_at is not None
    assert before + timedelta(days=5) <= expires_at <= datetime.now(UTC) + timedelta(days=5)


def test_migrate_outside_a_checkout_says_where_to_run_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # As an installed package run from elsewhere than the image's working directory.
    monkeypatch.setattr(paths, "ALEMBIC_INI", tmp_path / "alembic.ini")
    monkeypatch.chdir(tmp_path)

    with pytest.raises(SystemExit) as exc:
        main(["migrate"])

    assert "no alembic.ini" in str(exc.value) and str(tmp_path) in str(exc.value)


async def test_demo_vm_starts_a_vm_with_data_and_registers_it_once(
    committed_engine: AsyncEngine, tmp_path: Path
) -> None:
    vmkit.ensure_libvirtd()
    name = vmkit.unique_name("demo")
    async with committed_engine.begin() as conn:
        await conn.execute(
            insert(User).values(
                id=uuid.uuid4(), email="demo@example.com", name="Demo", password_hash="x"
            )
        )
    try:
        assert _ibp("setup-local", "--data-dir", str(tmp_path)).returncode == 0
        args = ("demo-vm", "--email", "demo@example.com", "--name", name, "--data-mib", "2")
        first = _ibp(*args, "--data-dir", str(tmp_path))
        assert first.returncode == 0, first.stderr
        again = _ibp(*args, "--data-dir", str(tmp_path))  # idempotent: the same instance
        assert again.returncode == 0 and again.stdout == first.stdout
        instance_id = uuid.UUID(first.stdout.strip())
        async with committed_engine.connect() as conn:
            row = (await conn.execute(select(Instance).where(Instance.id == instance_id))).one()
            disks = (
                await conn.execute(
                    select(InstanceDisk.target, InstanceDisk.boot, InstanceDisk.size_bytes).where(
                        InstanceDisk.instance_id == instance_id
                    )
                )
            ).all()
        assert row.domain_name == name and row.status == "deployed"
        assert disks == [("vda", True, 256 * 1024 * 1024)]
        conn_ = libvirt.open(vmkit.URI)
        try:
            assert conn_.lookupByName(name).isActive()
        finally:
            conn_.close()
        disk = tmp_path / "vms" / f"{name}-vda.qcow2"
        check = subprocess.run(
            ["qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P 0x5a 0 2M", str(disk)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert "Pattern verification failed" not in check.stdout + check.stderr
        assert "read 2097152/2097152" in check.stdout
    finally:
        vmkit.destroy_vm(name)
