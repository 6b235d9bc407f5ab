"""The `ibp` command: serve, worker, create-admin, openapi, migrate."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from app.main import create_app

    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info")


def _worker(args: argparse.Namespace) -> None:
    from worker.main import run_worker

    run_worker(hypervisor=args.hypervisor, control=not args.no_control)


async def _create_admin(email: str, password: str) -> None:
    from app.config import get_settings
    from app.db import build_engine, build_sessionmaker
    from app.users.service import ensure_admin

    engine = build_engine(get_settings())
    try:
        async with build_sessionmaker(engine)() as session:
            user, created = await ensure_admin(session, email, password)
            await session.commit()
    finally:
        await engine.dispose()
    print(f"{'Created' if created else 'Updated'} admin {user.email} ({user.id})")


async def _run_backup(backup_id: str) -> None:
    from app.config import get_settings
    from app.db import build_engine, build_sessionmaker
    from worker.tasks.backup import run_backup

    settings = get_settings()
    engine = build_engine(settings)
    try:
        result = await run_backup(
            {"settings": settings, "sessionmaker": build_sessionmaker(engine), "job_try": 1},
            backup_id,
        )
    finally:
        await engine.dispose()
    print(result)


def _openapi(_: argparse.Namespace) -> None:
    from app.main import create_app

    json.dump(create_app().openapi(), sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _migrate(_: argparse.Namespace) -> None:
    from alembic import command
    from alembic.config import Config

    from app.paths import ALEMBIC_INI

    command.upgrade(Config(str(ALEMBIC_INI)), "head")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ibp", description="Instance Backup Policies")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=_serve)

    worker = sub.add_parser("worker", help="run the scheduler/control worker and hypervisor jobs")
    worker.add_argument(
        "--hypervisor", help="serve this hypervisor's queue (name); default: none", default=None
    )
    worker.add_argument(
        "--no-control", action="store_true", help="do not run the control queue (tick, deletes)"
    )
    worker.set_defaults(func=_worker)

    admin = sub.add_parser("create-admin", help="create (or reset) an admin account")
    admin.add_argument("--email", required=True)
    admin.add_argument("--password", required=True)
    admin.set_defaults(func=lambda a: asyncio.run(_create_admin(a.email, a.password)))

    run_backup = sub.add_parser(
        "run-backup", help="run one pending backup now, in this process (for operators)"
    )
    run_backup.add_argument("backup_id")
    run_backup.set_defaults(func=lambda a: asyncio.run(_run_backup(a.backup_id)))

    openapi = sub.add_parser("openapi", help="print the OpenAPI document")
    openapi.set_defaults(func=_openapi)

    migrate = sub.add_parser("migrate", help="apply database migrations (alembic upgrade head)")
    migrate.set_defaults(func=_migrate)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
