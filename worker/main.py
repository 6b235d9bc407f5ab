"""arq workers: the control queue (tick, deletions) and one hypervisor's backup queue.

`ibp worker` runs the control queue; `ibp worker --hypervisor NAME` also serves that
hypervisor's queue with at most its max_concurrent_backups jobs at once. On one machine a
single process serves both.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from arq import Worker, cron, func
from arq.connections import RedisSettings
from sqlalchemy import select

from app.config import Settings, get_settings
from app.db import build_engine, build_sessionmaker
from app.models import Hypervisor
from app.queues import CONTROL_QUEUE, hypervisor_queue
from worker.tasks.backup import run_backup
from worker.tasks.control import tick
from worker.tasks.deletion import delete_backup_files
from worker.tasks.restore import run_restore
from worker.tasks.verify import verify_backup

log = logging.getLogger("ibp.worker")
BACKUP_TIMEOUT_S = 12 * 3600
RESTORE_TIMEOUT_S = 12 * 3600
VERIFY_TIMEOUT_S = 12 * 3600
DELETE_MAX_TRIES = 1000  # unreachable storage is retried with backoff, never given up silently


async def _find_hypervisor(settings: Settings, name: str) -> Hypervisor:
    engine = build_engine(settings)
    try:
        async with build_sessionmaker(engine)() as session:
            hv = await session.scalar(select(Hypervisor).where(Hypervisor.name == name))
    finally:
        await engine.dispose()
    if hv is None:
        raise SystemExit(f"No hypervisor named {name!r}: register it with POST /api/v1/hypervisors")
    return hv


def _job(function: Any) -> Any:
    """arq types a job's context as a plain dict; ours is the WorkerContext TypedDict."""
    return function


def _workers(settings: Settings, hypervisor: Hypervisor | None, control: bool) -> list[Worker]:
    engine = build_engine(settings)
    ctx: dict[str, Any] = {"settings": settings, "sessionmaker": build_sessionmaker(engine)}
    redis = RedisSettings.from_dsn(settings.redis_url)
    workers = []
    if control:
        workers.append(
            Worker(
                functions=[
                    func(_job(delete_backup_files), max_tries=DELETE_MAX_TRIES, timeout=600)
                ],
                cron_jobs=[cron(_job(tick), run_at_startup=True, unique=True, timeout=300)],
                queue_name=CONTROL_QUEUE,
                redis_settings=redis,
                ctx=dict(ctx),
                handle_signals=False,
            )
        )
    if hypervisor is not None:
        workers.append(
            Worker(
                functions=[
                    func(_job(run_backup), timeout=BACKUP_TIMEOUT_S, max_tries=2),
                    # A second try only cleans up after a dead worker (see _recover_interrupted).
                    func(_job(run_restore), timeout=RESTORE_TIMEOUT_S, max_tries=2),
                    # No kept result: the next verify of the same backup may reuse its job id.
                    func(_job(verify_backup), timeout=VERIFY_TIMEOUT_S, keep_result=0),
                ],
                queue_name=hypervisor_queue(hypervisor.id),
                max_jobs=hypervisor.max_concurrent_backups,
                redis_settings=redis,
                ctx=dict(ctx),
                handle_signals=False,
            )
        )
    return workers


async def _run(hypervisor_name: str | None, control: bool) -> None:
    settings = get_settings()
    hypervisor = await _find_hypervisor(settings, hypervisor_name) if hypervisor_name else None
    workers = _workers(settings, hypervisor, control)
    if not workers:
        raise SystemExit("Nothing to do: pass --hypervisor NAME or drop --no-control")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(w.async_run()) for w in workers]
    names = [w.queue_name for w in workers]
    log.info("worker serving %s", ", ".join(names))
    print(f"ibp worker serving queues: {', '.join(names)}", flush=True)
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for w in workers:
        await w.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def run_worker(hypervisor: str | None, control: bool = True) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(_run(hypervisor, control))
