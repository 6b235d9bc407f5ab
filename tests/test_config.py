"""Settings refuse an unsafe secret key outside development, in words an operator can act on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import Settings


@pytest.mark.parametrize("key", ["", "change-me", "short-but-not-placeholder"])
def test_weak_secret_key_is_refused_in_production(key: str) -> None:
    with pytest.raises(ValidationError, match="IBP_SECRET_KEY"):
        Settings(environment="production", secret_key=key)


def test_long_secret_key_is_accepted_in_production() -> None:
    assert Settings(environment="production", secret_key="k" * 40).secret_key == "k" * 40


def test_development_runs_with_the_placeholder() -> None:
    settings = Settings(environment="development", secret_key="change-me")
    assert settings.secret_key == "change-me"


def test_cli_refuses_to_start_with_a_clear_message_and_no_traceback() -> None:
    env = {**os.environ, "IBP_ENVIRONMENT": "production", "IBP_SECRET_KEY": "change-me"}
    done = subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", "serve", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "IBP_SECRET_KEY" in done.stderr and "Traceback" not in done.stderr


def test_storage_roots_default_to_the_data_dirs_backups_folder(tmp_path: Path) -> None:
    """`ibp setup-local` registers <data dir>/backups: the default root must allow it."""
    settings = Settings(data_dir=str(tmp_path / "var"), storage_roots=[])
    assert settings.storage_roots == [str(tmp_path / "var" / "backups")]
    given = Settings(storage_roots=["/srv/backups/", "/mnt//nfs"])
    assert given.storage_roots == ["/srv/backups", "/mnt/nfs"]


def test_a_relative_storage_root_is_refused() -> None:
    with pytest.raises(ValidationError, match="IBP_STORAGE_ROOTS"):
        Settings(storage_roots=["var/backups"])
