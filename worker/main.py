"""arq workers: the control queue (tick, deletions) and one hypervisor's queue (backups,
restores, verifications, storage checks).

`ibp worker` runs the control queue; `ibp worker --hypervisor NAME` also serves that
hypervisor's queue with at most its max_concurrent_backups jobs at once. On one machine a
single process serves both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import redis.exceptions as redis_errors
from arq import Worker, cron, func
from arq.connections import RedisSettings
from prometheus_client import start_http_server
from sqlalchemy import select

from app.config import Settings, get_settings
from app.db import build_engine, build_sessionmaker
from app.models import Hypervisor
from app.queues import CONTROL_QUEUE, hypervisor_queue
from worker import presence
from worker.jobs import RESOURCES, JobContext, Resources
from worker.tasks.backup import run_backup
from worker.tasks.check import CHECK_TIMEOUT_S, check_storage
from worker.tasks.control import tick
from worker.tasks.deletion import delete_backup_files
from worker.tasks.reconcile import reconcile_storages
from worker.tasks.restore import run_restore
from worker.tasks.verify import verify_backup
from worker.tasks.webhooks import deliver_webhooks

log = logging.getLogger("ibp.worker")
BACKUP_TIMEOUT_S = 12 * 3600
RESTORE_TIMEOUT_S = 12 * 3600
VERIFY_TIMEOUT_S = 12 * 3600
RECONCILE_HOURS = {3, 9, 15, 21}  # storages are compared with the catalog four times a day
WEBHOOKS_TIMEOUT_S = 900  # a run sends batch after batch; one cut short leaves the rest due
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


def _hooks(settings: Settings, worker_id: uuid.UUID) -> dict[str, Any]:
    """arq's startup and shutdown hooks: each worker builds its Resources, and disposes them."""

    async def on_startup(ctx: JobContext) -> None:
        ctx[RESOURCES] = Resources.open(settings, ctx.get("redis"), worker_id)

    return {"on_startup": on_startup, "on_shutdown": _dispose}


def _workers(
    settings: Settings, hypervisor: Hypervisor | None, control: bool, worker_id: uuid.UUID
) -> list[tuple[str, Callable[[], Worker]]]:
    """(queue name, factory) per queue served: each call makes a fresh arq Worker (_serve)."""
    redis = RedisSettings.from_dsn(settings.redis_url)
    workers: list[tuple[str, Callable[[], Worker]]] = []
    if control:

        def control_worker() -> Worker:
            return Worker(
                functions=[
                    func(delete_backup_files, max_tries=DELETE_MAX_TRIES, timeout=600),
                    # Retries are the delivery rows' own (next_attempt_at), never arq's.
                    func(
                        deliver_webhooks,
                        name="deliver_webhooks",
                        timeout=WEBHOOKS_TIMEOUT_S,
                        max_tries=1,
                        keep_result=0,
                    ),
                ],
                cron_jobs=[
                    cron(tick, run_at_startup=True, unique=True, timeout=300),
                    cron(
                        reconcile_storages,
                        hour=RECONCILE_HOURS,
                        minute=23,
                        unique=True,
                        timeout=3600,
                    ),
                ],
                queue_name=CONTROL_QUEUE,
                redis_settings=redis,
                handle_signals=False,
                **_hooks(settings, worker_id),
            )

        workers.append((CONTROL_QUEUE, control_worker))
    if hypervisor is not None:
        queue, max_jobs = hypervisor_queue(hypervisor.id), hypervisor.max_concurrent_backups

        def hypervisor_worker() -> Worker:
            return Worker(
                functions=[
                    func(run_backup, name="run_backup", timeout=BACKUP_TIMEOUT_S, max_tries=2),
                    # A second try only cleans up after a dead worker (Job.recover).
                    func(run_restore, name="run_restore", timeout=RESTORE_TIMEOUT_S, max_tries=2),
                    # No kept result: the next verify of the same backup may reuse its job id.
                    func(
                        verify_backup, name="verify_backup", timeout=VERIFY_TIMEOUT_S, keep_result=0
                    ),
                    # Checks run here, where backups reach the storage; the next check of the
                    # same storage reuses the job id.
                    func(
                        check_storage,
                        name="check_storage",
                        timeout=CHECK_TIMEOUT_S + 30,
                        max_tries=1,
                        keep_result=0,
                    ),
                ],
                queue_name=queue,
                max_jobs=max_jobs,
                redis_settings=redis,
                handle_signals=False,
                **_hooks(settings, worker_id),
            )

        workers.append((queue, hypervisor_worker))
    return workers


async def _run(hypervisor_name: str | None, control: bool) -> None:
    settings = get_settings()
    hypervisor = await _find_hypervisor(settings, hypervisor_name) if hypervisor_name else None
    if hypervisor is None and not control:
        raise SystemExit("Nothing to do: pass --hypervisor NAME or drop --no-control")
    res = Resources.open(settings, None)
    worker_id = await presence.register(res, hypervisor.id if hypervisor else None)
    present = asyncio.create_task(presence.keep_present(res, worker_id, hypervisor))
    try:
        if hypervisor is not None:
            recovered = await presence.recover_hypervisor(res, hypervisor)
            log.info(
                "hypervisor %s: %d job(s) left by an earlier worker recovered",
                hypervisor.name,
                recovered,
            )
        await _serve_all(_workers(settings, hypervisor, control, worker_id))
    finally:
        present.cancel()
        await asyncio.gather(present, return_exceptions=True)
        await presence.unregister(res, worker_id)
        await res.close()


async def _serve_all(workers: list[tuple[str, Callable[[], Worker]]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    names = [name for name, _ in workers]
    log.info("worker serving %s", ", ".join(names))
    print(f"ibp worker serving queues: {', '.join(names)}", flush=True)
    await asyncio.gather(*(_serve(make, stop) for _, make in workers))


# Redis itself is away (restarted, network): wait and start the worker again.
_REDIS_DOWN = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)
RECONNECT_FIRST_S = 1.0
RECONNECT_MAX_S = 30.0


async def _serve(make: Callable[[], Worker], stop: asyncio.Event) -> None:
    """Run one queue's arq worker until `stop`, surviving Redis outages.

    arq's worker ends when Redis goes away. Its running jobs are left to finish (their state
    is in PostgreSQL, and a half-done backup is not thrown away for a Redis blip), then a
    fresh worker connects, retrying with backoff. Jobs lost with Redis's memory are sent
    again by the tick (app.engine.lifecycle.redispatch_lost_jobs).
    """
    delay = RECONNECT_FIRST_S
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        worker = make()
        started = loop.time()
        running = asyncio.create_task(worker.async_run())
        halt = asyncio.create_task(stop.wait())
        await asyncio.wait([running, halt], return_when=asyncio.FIRST_COMPLETED)
        halt.cancel()
        if stop.is_set():
            with contextlib.suppress(*_REDIS_DOWN):  # stopping during an outage: nothing to tidy
                await worker.close()  # cancels running jobs: they record the interruption
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await _dispose(worker.ctx)
            return
        error = running.exception()
        if error is None:
            return
        if not isinstance(error, _REDIS_DOWN):
            raise error
        jobs = [task for task in worker.tasks.values() if not task.done()]
        log.warning(
            "queue %s: Redis is unreachable (%s); %d running job(s) finish first, then the "
            "worker reconnects",
            worker.queue_name,
            error,
            len(jobs),
        )
        if jobs and not await _until_done_or_stopped(jobs, stop):
            await asyncio.gather(*jobs, return_exceptions=True)
            await _dispose(worker.ctx)
            return
        with contextlib.suppress(Exception):  # best effort: its connections are already dead
            await worker.close()
        await _dispose(worker.ctx)
        if loop.time() - started > RECONNECT_MAX_S:
            delay = RECONNECT_FIRST_S  # it had been serving: a new outage starts the backoff
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, RECONNECT_MAX_S)


async def _dispose(ctx: JobContext) -> None:
    """A worker's Resources go with it: arq's shutdown hook, and _serve once the worker is done
    (during a Redis outage arq's close() stops at its first Redis call, before the hook)."""
    if (res := ctx.pop(RESOURCES, None)) is not None:
        await res.close()


async def _until_done_or_stopped(jobs: list[asyncio.Task[Any]], stop: asyncio.Event) -> bool:
    """True when the jobs ended; on stop, cancel them (they record it) and say False."""
    done = asyncio.create_task(asyncio.wait(jobs))
    halt = asyncio.create_task(stop.wait())
    await asyncio.wait([done, halt], return_when=asyncio.FIRST_COMPLETED)
    if done.done():
        halt.cancel()
        return True
    done.cancel()
    for job in jobs:
        job.cancel()
    return False


@contextlib.contextmanager
def metrics_server(host: str, port: int | None) -> Iterator[int | None]:
    """This process's metrics on http://host:port/metrics (Prometheus' own server, in a
    thread) while the block runs; no port, no server. Yields the port served."""
    if port is None:
        yield None
        return
    try:
        server, thread = start_http_server(port, addr=host)
    except OSError as exc:
        raise SystemExit(
            f"ibp worker: cannot serve metrics on {host}:{port}: {exc.strerror}"
        ) from None
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def run_worker(
    hypervisor: str | None,
    control: bool = True,
    metrics_port: int | None = None,
    metrics_host: str = "0.0.0.0",
) -> None:
    """Serve the queues until SIGINT/SIGTERM. Logging is the caller's (`ibp worker` sets it up
    from IBP_LOG_FORMAT and IBP_LOG_LEVEL, app.logs)."""
    with metrics_server(metrics_host, metrics_port):
        asyncio.run(_run(hypervisor, control))
