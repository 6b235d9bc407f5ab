"""The `ibp` command: serve, worker, migrate, create-admin, setup-local, create-token, demo-vm,
run-backup, reconcile, rotate-secrets, status, openapi.

Expected failures end in one line on stderr and an exit code, never a traceback; `_fail` in
`main` is the one place that turns them into words:
  1  refused: what was asked for does not exist or cannot be done (unknown email or backup...)
  2  usage: a missing or malformed argument (argparse)
  3  configuration refused (an IBP_* setting)
  4  PostgreSQL or Redis cannot be reached: try again when it is back
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from app.version import package_version

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from app.config import Settings
    from app.models import User

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNREACHABLE = 4


class CliError(Exception):
    """An expected failure of a command: its message is all the operator sees."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from app.logs import logging_config

    settings = _settings()  # refused settings are said once, here, not by each worker process
    # An import string and a factory: with --workers N, each process builds its own app. The
    # log config is applied in each process too: uvicorn's access and error lines come out in
    # IBP_LOG_FORMAT like ours.
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=logging_config(settings.log_format, settings.log_level),
        log_level=settings.log_level.lower(),
    )


def _worker(args: argparse.Namespace) -> None:
    from worker.main import run_worker

    run_worker(
        hypervisor=args.hypervisor,
        control=not args.no_control,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )


ADMIN_PASSWORD_ENV = "IBP_ADMIN_PASSWORD"


def _admin_password(password_file: str | None) -> str:
    """From --password-file, else IBP_ADMIN_PASSWORD, else asked twice at the terminal: never
    the command line, which other users of the machine can read in the process list."""
    if password_file is not None:
        try:
            text = Path(password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(
                f"cannot read the password file {password_file}: {exc.strerror}"
            ) from exc
        password = text.splitlines()[0] if text else ""
        if not password:
            raise CliError(f"the password file {password_file} is empty")
        return password
    if password := os.environ.get(ADMIN_PASSWORD_ENV, ""):
        return password
    if not sys.stdin.isatty():
        raise CliError(
            f"no password: give --password-file PATH or set {ADMIN_PASSWORD_ENV} "
            "(or run it at a terminal to be asked)"
        )
    import getpass

    password = getpass.getpass("Password for the admin: ")
    if getpass.getpass("The same password again: ") != password:
        raise CliError("the two passwords differ")
    return password


async def _create_admin(email: str, password_file: str | None, if_missing: bool) -> None:
    from app.config import get_settings
    from app.db import build_engine, build_sessionmaker
    from app.users.service import ensure_admin

    # Asked before connecting, unless the account's existence decides whether it is needed.
    password = None if if_missing else _admin_password(password_file)
    engine = build_engine(get_settings())
    try:
        async with build_sessionmaker(engine)() as session:
            if if_missing and (existing := await _find_user(session, email)) is not None:
                # A second start of scripts/dev: the admin may have changed its password since.
                print(f"User {existing.email} exists ({existing.id}): left as it is")
                return
            user, created = await ensure_admin(
                session, email, password or _admin_password(password_file)
            )
            await session.commit()
    finally:
        await engine.dispose()
    print(f"{'Created' if created else 'Updated'} admin {user.email} ({user.id})")


def _setup_local(data_dir: str) -> None:
    """One machine, one hypervisor: a location, a local-disk storage and this host, idempotent."""
    from pathlib import Path

    root = Path(data_dir).resolve()
    (root / "backups").mkdir(parents=True, exist_ok=True)
    (root / "scratch").mkdir(parents=True, exist_ok=True)
    asyncio.run(_register_local(root))
    print(f"Local setup ready: hypervisor 'local', storage 'local-disk' at {root / 'backups'}")


async def _register_local(root: Path) -> None:
    from sqlalchemy import select

    from app.config import get_settings
    from app.db import build_engine, build_sessionmaker
    from app.models import BackupStorage, Hypervisor, Location

    engine = build_engine(get_settings())
    try:
        async with build_sessionmaker(engine)() as session:
            location = await session.scalar(select(Location).where(Location.name == "local"))
            if location is None:
                location = Location(name="local")
                session.add(location)
            storage = await session.scalar(
                select(BackupStorage).where(BackupStorage.name == "local-disk")
            )
            if storage is None:
                storage = BackupStorage(
                    name="local-disk", kind="local", config={"path": str(root / "backups")}
                )
                session.add(storage)
            await session.flush()
            hypervisor = await session.scalar(select(Hypervisor).where(Hypervisor.name == "local"))
            if hypervisor is None:
                session.add(
                    Hypervisor(
                        name="local",
                        location_id=location.id,
                        libvirt_uri="qemu:///system",
                        backup_storage_id=storage.id,
                        scratch_dir=str(root / "scratch"),
                    )
                )
            await session.commit()
    finally:
        await engine.dispose()


async def _find_user(session: AsyncSession, email: str) -> User | None:
    from sqlalchemy import select

    from app.models import User

    return await session.scalar(select(User).where(User.email == email.strip().lower()))


async def _user_by_email(session: AsyncSession, email: str) -> User:
    user = await _find_user(session, email)
    if user is None:
        raise CliError(f"No user with email {email}")
    return user


async def _create_token(email: str, name: str) -> None:

    from app.auth.schemas import ApiTokenCreate
    from app.auth.service import create_token
    from app.config import get_settings
    from app.db import build_engine, build_sessionmaker

    settings = get_settings()
    engine = build_engine(settings)
    try:
        async with build_sessionmaker(engine)() as session:
            user = await _user_by_email(session, email)
            # With IBP_MAX_TOKEN_DAYS set, the operator's token lives as long as it may.
            days = settings.max_token_days
            payload = ApiTokenCreate(name=name, expires_in_days=days)
            _, token = await create_token(session, user, payload, max_days=days)
            await session.commit()
    finally:
        await engine.dispose()
    print(token)


async def _run_backup(backup_id: uuid.UUID) -> None:
    from sqlalchemy import select

    from app.config import get_settings
    from app.models import Backup
    from app.values import BackupStatus
    from worker.jobs import RESOURCES, Resources
    from worker.tasks.backup import run_backup

    res = Resources.open(get_settings(), None)
    try:
        async with res.session() as session:
            status = await session.scalar(select(Backup.status).where(Backup.id == backup_id))
        if status is None:
            raise CliError(f"No backup {backup_id}")
        if status != BackupStatus.PENDING:
            raise CliError(f"Backup {backup_id} is {status}: only a pending backup can be run")
        result = await run_backup({RESOURCES: res, "job_try": 1}, str(backup_id))
    finally:
        await res.close()
    if result == "not pending" or result.startswith("failed"):
        raise CliError(f"Backup {backup_id} {result}")
    print(result)


async def _reconcile(dry_run: bool, window_hours: float) -> int:
    from datetime import timedelta

    from app.config import get_settings
    from worker.jobs import Resources
    from worker.tasks.reconcile import reconcile_all

    res = Resources.open(get_settings(), None)
    try:
        results = await reconcile_all(res, timedelta(hours=window_hours), dry_run)
    finally:
        await res.close()
    failed = 0
    for result in results:
        if isinstance(result, str):
            failed += 1
            print(result)
            continue
        print(result.summary() + (" (dry run: nothing changed)" if dry_run else ""))
        for key in result.deleted:
            print(f"  {'would delete' if dry_run else 'deleted'} orphan {key}")
        for key in result.discarded:
            print(f"  {'would discard' if dry_run else 'discarded'} unfinished upload {key}")
        for backup_id in result.missing:
            print(f"  backup {backup_id}: files missing")
    return 1 if failed else 0


async def _status() -> int:
    """Every worker seen, and whether each hypervisor has a live one (exit 1 naming those
    that have none)."""
    from datetime import UTC, datetime

    from app.config import get_settings
    from app.db import build_engine, build_sessionmaker
    from app.engine.workers import presence
    from app.units import duration_human

    engine = build_engine(get_settings())
    try:
        async with build_sessionmaker(engine)() as session:
            now = datetime.now(UTC)
            seen = await presence(session, now)
    finally:
        await engine.dispose()
    rows = [("WORKER", "HOST", "PID", "LAST HEARTBEAT", "JOBS", "VERSION", "STATE")]
    for w in seen.workers:
        state = "live" if w.live else "stopped" if w.stopped_at is not None else "gone"
        rows.append(
            (
                w.hypervisor or "control",
                w.host,
                str(w.pid),
                f"{duration_human((now - w.seen_at).total_seconds())} ago",
                str(w.jobs),
                w.version or "-",
                state,
            )
        )
    if seen.workers:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print(
                "  ".join(
                    cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                ).rstrip()
            )
    else:
        print("No worker has been seen.")
    for name in seen.unserved:
        print(f"ibp status: hypervisor {name} has no live worker", file=sys.stderr)
    return 1 if seen.unserved else 0


async def _demo_vm(email: str, name: str, disk: Path, size_mib: int, data_mib: int) -> None:
    """A running demo VM on hypervisor 'local', registered as an instance of `email`'s."""
    from sqlalchemy import select

    from app.config import get_settings
    from app.db import build_engine, build_sessionmaker
    from app.models import Hypervisor, Instance, InstanceDisk
    from app.values import InstanceStatus
    from app.virt.demo import ensure_demo_vm

    mib = 1024 * 1024
    engine = build_engine(get_settings())
    try:
        async with build_sessionmaker(engine)() as session:
            user = await _user_by_email(session, email)
            hypervisor = await session.scalar(select(Hypervisor).where(Hypervisor.name == "local"))
            if hypervisor is None:
                raise CliError("No hypervisor 'local': run `ibp setup-local` first")
            await asyncio.to_thread(
                ensure_demo_vm, hypervisor.libvirt_uri, name, disk, size_mib * mib, data_mib * mib
            )
            instance = await session.scalar(
                select(Instance).where(
                    Instance.hypervisor_id == hypervisor.id, Instance.domain_name == name
                )
            )
            if instance is not None and instance.deleting_at is not None:
                raise CliError(
                    f"Instance {instance.id} ({name}) is being deleted with its backups; "
                    "run this again when the worker has removed them"
                )
            if instance is None:
                instance = Instance(
                    name=name,
                    owner_id=user.id,
                    hypervisor_id=hypervisor.id,
                    domain_name=name,
                    status=InstanceStatus.DEPLOYED,
                    disks=[InstanceDisk(target="vda", boot=True, size_bytes=size_mib * mib)],
                )
                session.add(instance)
                await session.commit()
    finally:
        await engine.dispose()
    print(
        f"Demo VM {name!r} is running (disk {disk}, first {data_mib} MiB written); "
        f"it is instance {instance.id} of {email}.",
        file=sys.stderr,
    )
    print(instance.id)


async def _rotate_secrets() -> int:
    """Seal every storage's secrets and every webhook's signing secret with the current
    IBP_SECRET_KEY; 1 when some do not open (then nothing changes)."""
    from sqlalchemy import select

    from app.config import get_settings
    from app.db import build_engine, build_sessionmaker
    from app.engine.storage_access import reseal_secrets
    from app.engine.webhooks.events import reseal_secrets as reseal_webhook_secrets
    from app.errors import SecretsUndecryptable
    from app.models import BackupStorage, WebhookEndpoint
    from app.security import WrongSecretKey

    engine = build_engine(get_settings())
    try:
        async with build_sessionmaker(engine)() as session:
            # Locked, so a row updated meanwhile is not overwritten with its old secrets.
            storages = await session.scalars(
                select(BackupStorage).order_by(BackupStorage.name).with_for_update()
            )
            endpoints = await session.scalars(
                select(WebhookEndpoint).order_by(WebhookEndpoint.id).with_for_update()
            )
            try:
                count = reseal_secrets(storages)
                hooks = reseal_webhook_secrets(endpoints)
            except SecretsUndecryptable as exc:
                print(f"ibp rotate-secrets: nothing changed. {exc.detail}", file=sys.stderr)
                return 1
            except WrongSecretKey as exc:
                print(f"ibp rotate-secrets: nothing changed. {exc}", file=sys.stderr)
                return 1
            await session.commit()
    finally:
        await engine.dispose()
    print(
        f"Re-encrypted the secrets of {count} backup storage(s) and {hooks} webhook "
        "endpoint(s) with the current IBP_SECRET_KEY"
    )
    return 0


def _openapi(_: argparse.Namespace) -> None:
    from app.main import create_app

    json.dump(create_app().openapi(), sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _migrate(_: argparse.Namespace) -> None:
    from alembic import command
    from alembic.config import Config

    from app import paths

    if not paths.ALEMBIC_INI.exists():
        # An installed package ships no migrations: they sit beside alembic.ini (the image's
        # working directory, or a checkout).
        raise CliError(
            f"no alembic.ini beside the package ({paths.ROOT}) nor in the current "
            f"directory ({Path.cwd()}). Run it from the directory holding alembic.ini and "
            "migrations/ (/srv/ibp in the image)."
        )
    config = Config(str(paths.ALEMBIC_INI))
    config.attributes["configure_logger"] = False  # ours (IBP_LOG_*), not alembic.ini's
    command.upgrade(config, "head")


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _settings() -> Settings:
    from app.config import get_settings

    return get_settings()


def _setup_logging() -> None:
    """Every command logs as IBP_LOG_FORMAT and IBP_LOG_LEVEL say (a refused setting: exit 3)."""
    from app.logs import setup_logging

    settings = _settings()
    setup_logging(settings.log_format, settings.log_level)


class _Parser(argparse.ArgumentParser):
    """A usage error in one line, with where to read more (argparse prints the whole usage).
    No abbreviated options: `--password` must not quietly mean `--password-file`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ibp", description="Instance Backup Policies")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
    serve.add_argument(
        "--workers", type=_at_least_one, default=1, help="API processes sharing the port (1)"
    )
    serve.set_defaults(func=_serve)

    worker = sub.add_parser("worker", help="run the scheduler/control worker and hypervisor jobs")
    worker.add_argument(
        "--hypervisor", help="serve this hypervisor's queue (name); default: none", default=None
    )
    worker.add_argument(
        "--no-control", action="store_true", help="do not run the control queue (tick, deletes)"
    )
    worker.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics; default: off",
    )
    worker.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        metavar="HOST",
        help="address the metrics listen on (0.0.0.0; they carry no tenant data)",
    )
    worker.set_defaults(func=_worker)

    admin = sub.add_parser(
        "create-admin",
        help="create an admin account, or make the account admin with this password; the "
        f"password comes from --password-file, else {ADMIN_PASSWORD_ENV}, else a prompt",
    )
    admin.add_argument("--email", required=True, help="the admin's email (login)")
    admin.add_argument(
        "--password-file",
        metavar="PATH",
        help="read the password from the first line of this file",
    )
    admin.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing when an account with this email exists (its password stays)",
    )
    admin.set_defaults(
        func=lambda a: asyncio.run(_create_admin(a.email, a.password_file, a.if_missing))
    )

    local = sub.add_parser(
        "setup-local", help="register this machine as hypervisor 'local' with local-disk storage"
    )
    local.add_argument("--data-dir", default=None, help="default: IBP_DATA_DIR (./var)")
    local.set_defaults(func=lambda a: _setup_local(a.data_dir or _settings().data_dir))

    token = sub.add_parser("create-token", help="print a new personal API token for a user")
    token.add_argument("--email", required=True, help="the user the token acts as")
    token.add_argument("--name", default="cli", help="the token's name, to recognise it (cli)")
    token.set_defaults(func=lambda a: asyncio.run(_create_token(a.email, a.name)))

    reconcile = sub.add_parser(
        "reconcile",
        help="compare every backup storage with the catalog: delete orphaned objects and "
        "unfinished uploads, mark backups whose files are missing",
    )
    reconcile.add_argument(
        "--dry-run", action="store_true", help="report what would change, change nothing"
    )
    reconcile.add_argument(
        "--window-hours",
        type=float,
        default=24.0,
        help="leave objects younger than this alone (a job may still be writing them)",
    )
    reconcile.set_defaults(
        func=lambda a: sys.exit(asyncio.run(_reconcile(a.dry_run, a.window_hours)))
    )

    run_backup = sub.add_parser(
        "run-backup", help="run one pending backup now, in this process (for operators)"
    )
    run_backup.add_argument(
        "backup_id", type=_uuid, metavar="BACKUP_ID", help="id of a pending backup"
    )
    run_backup.set_defaults(func=lambda a: asyncio.run(_run_backup(a.backup_id)))

    demo = sub.add_parser(
        "demo-vm",
        help="start a small demo VM on hypervisor 'local' and register it (prints its id)",
    )
    demo.add_argument("--email", required=True, help="the instance's owner")
    demo.add_argument("--name", default="ibp-demo", help="libvirt domain name (ibp-demo)")
    demo.add_argument("--size-mib", type=int, default=256, help="disk size (256)")
    demo.add_argument("--data-mib", type=int, default=64, help="MiB written at first (64)")
    demo.add_argument("--data-dir", default=None, help="default: IBP_DATA_DIR (./var)")
    demo.set_defaults(
        func=lambda a: asyncio.run(
            _demo_vm(
                a.email,
                a.name,
                Path(a.data_dir or _settings().data_dir).resolve() / "vms" / f"{a.name}-vda.qcow2",
                a.size_mib,
                a.data_mib,
            )
        )
    )

    rotate = sub.add_parser(
        "rotate-secrets",
        help="re-encrypt every storage's secrets with IBP_SECRET_KEY (they may be sealed with "
        "one of IBP_PREVIOUS_SECRET_KEYS); exit 1, changing nothing, if some cannot be decrypted",
    )
    rotate.set_defaults(func=lambda a: sys.exit(asyncio.run(_rotate_secrets())))

    status = sub.add_parser(
        "status",
        help="list every worker seen (hypervisor, host, pid, last heartbeat, jobs running, "
        "version); exit 1 when a hypervisor has no live worker",
    )
    status.set_defaults(func=lambda _: sys.exit(asyncio.run(_status())))

    openapi = sub.add_parser("openapi", help="print the OpenAPI document")
    openapi.set_defaults(func=_openapi)

    migrate = sub.add_parser("migrate", help="apply database migrations (alembic upgrade head)")
    migrate.set_defaults(func=_migrate)

    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        _setup_logging()
        args.func(args)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as exc:
        failure = _fail(exc)
        if failure is None:
            raise  # a bug: its traceback is wanted
        code, message = failure
        print(f"ibp {args.command}: {message}", file=sys.stderr)
        raise SystemExit(code) from None


def _fail(exc: Exception) -> tuple[int, str] | None:
    """The exit code and one line for an expected failure; None for anything else."""
    from pydantic import ValidationError

    from app.virt.errors import VirtError

    if isinstance(exc, CliError):
        return exc.code, str(exc)
    if isinstance(exc, ValidationError):
        settings = exc.title == "Settings"
        messages = "; ".join(
            _field(e["loc"], settings) + str(e["msg"]).removeprefix("Value error, ")
            for e in exc.errors()
        )
        if settings:
            return EXIT_CONFIG, f"configuration refused: {messages}"
        return EXIT_REFUSED, messages
    if isinstance(exc, VirtError):
        return EXIT_REFUSED, str(exc)
    if (service := _unreachable(exc)) is not None:
        return EXIT_UNREACHABLE, f"{service}: {_reason(exc)}"
    return None


def _field(loc: tuple[int | str, ...], settings: bool) -> str:
    """A setting by its variable's name (IBP_DB_POOL_SIZE), a payload's field by its own."""
    if not loc:
        return ""
    name = ".".join(map(str, loc))
    return f"IBP_{name.upper()}: " if settings else f"{name}: "


def _unreachable(exc: BaseException) -> str | None:
    """Which of PostgreSQL and Redis could not be reached or refused us, named with its URL
    (password hidden); None when the error is neither."""
    import traceback

    import asyncpg.exceptions
    import redis.exceptions
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    from app.db import database_unreachable

    settings = _settings()
    database = f"PostgreSQL ({make_url(settings.database_url).render_as_string()}) "
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    if any(
        isinstance(e, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)
        for e in chain
    ):
        return f"Redis ({_hide_password(settings.redis_url)}) cannot be reached"
    if database_unreachable(exc):
        return database + "cannot be reached"
    refused = (
        asyncpg.exceptions.InvalidAuthorizationSpecificationError,
        asyncpg.exceptions.InvalidCatalogNameError,
    )
    if isinstance(exc, DBAPIError) and any(isinstance(e, refused) for e in chain):
        return database + "refused the connection"
    # A name that does not resolve, or every address refusing: asyncpg raises plain OSErrors.
    if isinstance(exc, OSError) and any(
        "/asyncpg/" in frame.filename for frame in traceback.extract_tb(exc.__traceback__)
    ):
        return database + "cannot be reached"
    return None


def _reason(exc: BaseException) -> str:
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig.__cause__ or exc.orig  # asyncpg's words, not SQLAlchemy's wrapping
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hide_password(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


if __name__ == "__main__":
    main()
