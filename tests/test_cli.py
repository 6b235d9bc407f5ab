"""The `ibp` command as an operator uses it, against the test database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app import paths
from app.cli import main
from app.models import BackupStorage, Hypervisor


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


def test_migrate_outside_a_checkout_says_where_to_run_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # As an installed package run from elsewhere than the image's working directory.
    monkeypatch.setattr(paths, "ALEMBIC_INI", tmp_path / "alembic.ini")
    monkeypatch.chdir(tmp_path)

    with pytest.raises(SystemExit) as exc:
        main(["migrate"])

    assert "no alembic.ini" in str(exc.value) and str(tmp_path) in str(exc.value)
