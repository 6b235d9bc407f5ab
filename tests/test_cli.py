"""The `ibp` command as an operator uses it, against the test database."""

from __future__ import annotations

import argparse
import contextlib
import os
import pty
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path

import libvirt
import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app import paths
from app.cli import _fail, build_parser, main
from app.models import ApiToken, BackupStorage, Hypervisor, Instance, InstanceDisk, User
from app.security import token_digest, verify_password
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


def _one_line(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The failure's only line on stderr, after checking its exit code."""
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_create_token_refuses_an_unknown_email() -> None:
    line = _one_line(_ibp("create-token", "--email", "nobody@example.com"), 1)
    assert line == "ibp create-token: No user with email nobody@example.com"


CLOSED = "postgresql+asyncpg://postgres@127.0.0.1:1/ibp"
SOME_ID = "0b6f1d34-55a4-4f7e-9d1c-1f1b2d3c4e5f"


@pytest.mark.parametrize(
    "args",
    [
        ("create-token", "--email", "ops@example.com"),
        ("create-admin", "--email", "ops@example.com"),
        ("setup-local", "--data-dir", "/tmp/ibp-unused"),
        ("run-backup", SOME_ID),
        ("reconcile",),
        ("migrate",),
        ("demo-vm", "--email", "ops@example.com"),
    ],
)
def test_a_command_without_postgresql_says_so_in_one_line(args: tuple[str, ...]) -> None:
    done = _ibp(*args, IBP_DATABASE_URL=CLOSED, IBP_ADMIN_PASSWORD="a-long-password")
    line = _one_line(done, 4)
    assert line.startswith(f"ibp {args[0]}: PostgreSQL ({CLOSED}) cannot be reached: ")
    assert "Connect call failed" in line


def test_a_refused_database_login_is_named_and_the_password_hidden() -> None:
    url = "postgresql+asyncpg://nobody-here:sekrit@127.0.0.1:5432/ibp"
    line = _one_line(_ibp("create-token", "--email", "x@example.com", IBP_DATABASE_URL=url), 4)
    assert "PostgreSQL (postgresql+asyncpg://nobody-here:***@127.0.0.1:5432/ibp) refused" in line
    assert "sekrit" not in line and 'role "nobody-here" does not exist' in line


def test_redis_out_of_reach_is_named_with_its_url() -> None:
    import redis

    client = redis.Redis.from_url("redis://:sekrit@127.0.0.1:1/0")
    with pytest.raises(redis.exceptions.ConnectionError) as caught:
        client.ping()
    failure = _fail(caught.value)
    assert failure is not None
    code, message = failure
    assert code == 4 and message.startswith("Redis (")
    assert "cannot be reached" in message and "Connection refused" in message


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"IBP_DB_POOL_SIZE": "many"}, "IBP_DB_POOL_SIZE: Input should be a valid integer"),
        ({"IBP_DATABASE_URL": "not-a-url"}, "IBP_DATABASE_URL: not a database URL"),
        ({"IBP_ENVIRONMENT": "production", "IBP_SECRET_KEY": "short"}, "IBP_SECRET_KEY is"),
        ({"IBP_LOG_FORMAT": "xml"}, "IBP_LOG_FORMAT: Input should be 'text' or 'json'"),
        ({"IBP_LOG_LEVEL": "loud"}, "IBP_LOG_LEVEL: 'loud' is not a log level (DEBUG, INFO,"),
    ],
)
def test_a_refused_setting_is_named_in_one_line(env: dict[str, str], says: str) -> None:
    line = _one_line(_ibp("create-token", "--email", "x@example.com", **env), 3)
    assert line.startswith("ibp create-token: configuration refused: ") and says in line


def test_run_backup_of_a_malformed_id_is_a_usage_error() -> None:
    line = _one_line(_ibp("run-backup", "no-such-id"), 2)
    assert line == (
        "ibp run-backup: argument BACKUP_ID: not a UUID: 'no-such-id' (see ibp run-backup --help)"
    )


async def test_run_backup_of_an_unknown_id_fails(committed_engine: AsyncEngine) -> None:
    line = _one_line(_ibp("run-backup", SOME_ID), 1)
    assert line == f"ibp run-backup: No backup {SOME_ID}"


def test_every_option_has_help() -> None:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, command in sub.choices.items()
        for action in command._actions
        if not action.help
    ]
    assert missing == []
    assert {c.dest for c in sub._choices_actions} == set(sub.choices)  # each command too
    assert all(c.help for c in sub._choices_actions)


def test_version_is_the_installed_packages() -> None:
    done = _ibp("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"ibp {version('ibp')}"


async def _password_hash(engine: AsyncEngine, email: str) -> str | None:
    async with engine.connect() as conn:
        return await conn.scalar(select(User.password_hash).where(User.email == email))


async def test_create_admin_reads_the_password_from_a_file_or_the_environment(
    committed_engine: AsyncEngine, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("from-the-file-1\n")
    done = _ibp("create-admin", "--email", "root@example.com", "--password-file", str(secret))
    assert done.returncode == 0, done.stderr
    stored = await _password_hash(committed_engine, "root@example.com")
    assert stored is not None and verify_password("from-the-file-1", stored)

    env = {"IBP_ADMIN_PASSWORD": "from-the-env-2"}
    # --if-missing leaves an existing account (and its password) alone...
    done = _ibp("create-admin", "--email", "root@example.com", "--if-missing", **env)
    assert done.returncode == 0 and "left as it is" in done.stdout
    assert await _password_hash(committed_engine, "root@example.com") == stored
    # ...an explicit create-admin resets it.
    done = _ibp("create-admin", "--email", "root@example.com", **env)
    assert done.returncode == 0 and done.stdout.startswith("Updated admin root@example.com")
    stored = await _password_hash(committed_engine, "root@example.com")
    assert stored is not None and verify_password("from-the-env-2", stored)


async def test_create_admin_if_missing_creates_a_missing_admin(
    committed_engine: AsyncEngine,
) -> None:
    done = _ibp(
        "create-admin", "--email", "new@example.com", "--if-missing", IBP_ADMIN_PASSWORD="pw-3-long"
    )
    assert done.returncode == 0 and done.stdout.startswith("Created admin new@example.com")


def test_create_admin_takes_no_password_on_the_command_line() -> None:
    done = _ibp("create-admin", "--email", "a@example.com", "--password", "visible-in-ps")
    assert "unrecognized arguments: --password visible-in-ps" in _one_line(done, 2)


def test_create_admin_without_a_password_source_says_where_to_give_one(tmp_path: Path) -> None:
    line = _one_line(_ibp("create-admin", "--email", "a@example.com", IBP_ADMIN_PASSWORD=""), 1)
    assert "give --password-file PATH or set IBP_ADMIN_PASSWORD" in line
    (tmp_path / "empty").write_text("")
    done = _ibp(
        "create-admin", "--email", "a@example.com", "--password-file", str(tmp_path / "empty")
    )
    assert _one_line(done, 1).endswith(f"the password file {tmp_path / 'empty'} is empty")
    short = _ibp("create-admin", "--email", "a@example.com", IBP_ADMIN_PASSWORD="short")
    assert _one_line(short, 1) == (
        "ibp create-admin: password: String should have at least 8 characters"
    )


async def test_create_admin_asks_twice_at_a_terminal(committed_engine: AsyncEngine) -> None:
    env = {**os.environ, "IBP_ADMIN_PASSWORD": ""}
    for answers, code in ((["typed-pw-1", "typed-pw-2"], 1), (["typed-pw-1", "typed-pw-1"], 0)):
        pid, fd = pty.fork()
        if pid == 0:  # the child, on the terminal
            os.execve(
                sys.executable,
                [sys.executable, "-m", "app.cli", "create-admin", "--email", "tty@example.com"],
                env,
            )
        output = b""
        for answer in answers:
            while b": " not in output.rsplit(b"\n", 1)[-1]:
                output += os.read(fd, 1024)
            os.write(fd, answer.encode() + b"\n")
            output += os.read(fd, 1024)
        with contextlib.suppress(OSError):  # the terminal closes with the child
            while chunk := os.read(fd, 1024):
                output += chunk
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == code, output
        assert b"typed-pw" not in output  # not echoed
    assert b"the two passwords differ" not in output
    stored = await _password_hash(committed_engine, "tty@example.com")
    assert stored is not None and verify_password("typed-pw-1", stored)


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
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # As an installed package run from elsewhere than the image's working directory.
    monkeypatch.setattr(paths, "ALEMBIC_INI", tmp_path / "alembic.ini")
    monkeypatch.chdir(tmp_path)
    # In this process: the root logger must stay pytest's (app.logs is tested in test_logs).
    monkeypatch.setattr("app.cli._setup_logging", lambda: None)

    with pytest.raises(SystemExit) as exc:
        main(["migrate"])

    said = capsys.readouterr().err
    assert exc.value.code == 1
    assert said.startswith("ibp migrate: no alembic.ini") and str(tmp_path) in said


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
