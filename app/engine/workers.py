"""Which worker processes are alive, and the work whose worker is not.

Every worker process has a row it touches every BEAT_S; each job it claims carries its id.
So a job whose worker is gone is known without waiting for a timeout: the hypervisor's next
worker cleans it up as it starts (worker.presence), and the tick fails what no worker will
ever run (fail_unattended).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, delete, func, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Backup, Hypervisor, Instance, Restore, Worker
from app.values import BackupStatus

BEAT_S = 5.0
# A worker not seen for this long is gone (unless it said so, or its process is found dead on
# its host: then at once). Long enough to ride out a short database restart, when no worker
# can say it is alive.
GONE_AFTER = timedelta(minutes=2)
# A job without a worker id (run by `ibp run-backup`, or claimed before workers had ids) is
# lost when its own heartbeat (every 2 s) is this old.
HEARTBEAT_LOST = timedelta(seconds=30)
FORGET_AFTER = timedelta(days=7)  # rows of stopped workers are kept this long, for operators


def no_worker(name: str) -> str:
    """The operator's words; the owner reads NO_WORKER (no hypervisor name)."""
    return f"No worker is running for hypervisor {name}"


NO_WORKER = "No backup worker is running for this instance's hypervisor; the operators are told"


WORKER_GONE = "The worker stopped during the job; it was cleaned up and the next run retries"


def is_live(now: datetime) -> ColumnElement[bool]:
    return and_(Worker.stopped_at.is_(None), Worker.seen_at > now - GONE_AFTER)


def served(now: datetime) -> Select[uuid.UUID | None]:
    """The hypervisors a live worker serves: any other one has no worker."""
    return select(Worker.hypervisor_id).where(Worker.hypervisor_id.is_not(None), is_live(now))


async def register(
    session: AsyncSession,
    hypervisor_id: uuid.UUID | None,
    host: str,
    pid: int,
    now: datetime,
    process_alive: Callable[[int], bool],
    version: str | None = None,
) -> uuid.UUID:
    """A new worker process. Earlier workers on this host whose process is gone are marked
    stopped at once: their jobs need not wait for GONE_AFTER to pass."""
    earlier = await session.execute(
        select(Worker.id, Worker.pid).where(Worker.host == host, Worker.stopped_at.is_(None))
    )
    dead = [worker_id for worker_id, old_pid in earlier if not process_alive(old_pid)]
    if dead:
        await session.execute(update(Worker).where(Worker.id.in_(dead)).values(stopped_at=now))
    worker = Worker(
        id=uuid.uuid4(),
        hypervisor_id=hypervisor_id,
        host=host,
        pid=pid,
        started_at=now,
        version=version,
    )
    worker.seen_at = now
    session.add(worker)
    await session.flush()
    return worker.id


async def beat(session: AsyncSession, worker_id: uuid.UUID, now: datetime) -> None:
    await session.execute(update(Worker).where(Worker.id == worker_id).values(seen_at=now))


async def stop(session: AsyncSession, worker_id: uuid.UUID, now: datetime) -> None:
    await session.execute(
        update(Worker).where(Worker.id == worker_id).values(seen_at=now, stopped_at=now)
    )


def unattended(model: type[Backup] | type[Restore], now: datetime) -> ColumnElement[bool]:
    """In progress, and nobody is running it: the one rule for the tick and the workers."""
    live = select(Worker.id).where(is_live(now))
    return and_(
        model.status == BackupStatus.IN_PROGRESS,
        or_(
            model.worker_id.not_in(live),
            and_(model.worker_id.is_(None), model.heartbeat_at < now - HEARTBEAT_LOST),
        ),
    )


async def orphaned(
    session: AsyncSession,
    model: type[Backup] | type[Restore],
    hypervisor_id: uuid.UUID,
    now: datetime,
) -> list[uuid.UUID]:
    """Rows of `model` in progress on the hypervisor that nobody is running."""
    rows = await session.scalars(
        select(model.id)
        .join(Instance, Instance.id == model.instance_id)
        .where(Instance.hypervisor_id == hypervisor_id, unattended(model, now))
    )
    return list(rows)


async def fail_unattended(session: AsyncSession, now: datetime) -> list[Any]:
    """The tick's part: pending work on a hypervisor no live worker has served for GONE_AFTER
    fails saying so, and running work that nobody runs fails too (the hypervisor's next
    worker cleans up what it left). The failed rows."""
    failed: list[Any] = []
    for model in (Backup, Restore):
        done = {"status": BackupStatus.FAILED, "completed_at": now, "progress": None}
        failed += (
            await session.scalars(
                update(model)
                .where(
                    model.status == BackupStatus.PENDING,
                    model.created_at < now - GONE_AFTER,
                    model.instance_id == Instance.id,
                    Instance.hypervisor_id == Hypervisor.id,
                    Hypervisor.id.not_in(served(now)),
                )
                .values(
                    **done, error=NO_WORKER, error_detail=literal(no_worker("")) + Hypervisor.name
                )
                .returning(model)
            )
        ).all()
        failed += (
            await session.scalars(
                update(model)
                .where(unattended(model, now))
                .values(**done, error=WORKER_GONE)
                .returning(model)
            )
        ).all()
    await session.execute(delete(Worker).where(Worker.seen_at < now - FORGET_AFTER))
    return failed


@dataclass(frozen=True)
class WorkerSeen:
    """One worker process as `ibp status` shows it."""

    hypervisor: str | None  # None: a control-only worker
    host: str
    pid: int
    seen_at: datetime
    stopped_at: datetime | None
    version: str | None
    jobs: int  # backups and restores it runs now
    live: bool


@dataclass(frozen=True)
class Presence:
    workers: list[WorkerSeen]
    unserved: list[str]  # names of the hypervisors no live worker serves


async def presence(session: AsyncSession, now: datetime) -> Presence:
    """Every worker row kept (live ones first, the newest first), and the hypervisors without
    a live worker: what `ibp status` prints."""

    def running(model: type[Backup] | type[Restore]) -> Any:
        return (
            select(func.count())
            .select_from(model)
            .where(model.worker_id == Worker.id, model.status == BackupStatus.IN_PROGRESS)
            .scalar_subquery()
        )

    jobs = running(Backup) + running(Restore)
    live = is_live(now)
    rows = await session.execute(
        select(
            Hypervisor.name,
            Worker.host,
            Worker.pid,
            Worker.seen_at,
            Worker.stopped_at,
            Worker.version,
            jobs,
            live,
        )
        .outerjoin(Hypervisor, Hypervisor.id == Worker.hypervisor_id)
        .order_by(live.desc(), Hypervisor.name.nulls_first(), Worker.seen_at.desc())
    )
    unserved = await session.scalars(
        select(Hypervisor.name).where(Hypervisor.id.not_in(served(now))).order_by(Hypervisor.name)
    )
    return Presence([WorkerSeen(*row) for row in rows], list(unserved))
