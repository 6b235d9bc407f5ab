"""The one skeleton every hypervisor job runs in (backup, restore, verify).

Written once here: the typed resources a job uses, the claim of its row (under the instance's
row lock, one job of an instance at a time), the heartbeat and progress, the failure in words
its reader understands, cancellation and the recovery after a worker died mid-job. A job says
only what is its own: what it loads, what it does, what it refuses and what it cleans up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from arq.connections import ArqRedis
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app import virt
from app.config import Settings
from app.db import build_engine, build_sessionmaker, database_unreachable
from app.engine.chain_fetch import ChainError
from app.engine.chains import Busy, busy
from app.engine.lifecycle import NotRecorded
from app.engine.webhooks.events import queue_delivery_if_emitted
from app.engine.words import Words
from app.engine.workers import unattended
from app.errors import SecretsUndecryptable
from app.logs import ProgressLog, job_context
from app.metrics import COMPLETED, FAILED, JobMetrics
from app.models import Backup, Instance, Restore
from app.models.base import utcnow
from app.queues import JobQueue
from app.storage.base import StorageError, StorageFull, StorageUnreachable
from app.units import size_human
from app.values import ACTIVE, BackupStatus

log = logging.getLogger(__name__)
HEARTBEAT_S = 2.0  # progress reaches the API at least this often
# A job's outcome is written until PostgreSQL takes it: tried again at these growing intervals.
RECORD_RETRY_FIRST_S = 0.5
RECORD_RETRY_MAX_S = 5.0
STOPPING_RECORD_S = 10.0  # how long a cancelled job tries to record its interruption
RESOURCES = "ibp"  # the key of our Resources in arq's job context
# arq's job context: its own fields (job_try, redis, ...) and ours under RESOURCES.
JobContext = dict[str, Any]


def now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Resources:
    """What every job uses: built in arq's startup hook, disposed in its shutdown hook."""

    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    redis: ArqRedis | None = None
    engine: AsyncEngine | None = None  # owned: disposed by close()
    worker_id: uuid.UUID | None = None  # this process's row in `workers`, stamped on claims

    @classmethod
    def open(
        cls, settings: Settings, redis: ArqRedis | None, worker_id: uuid.UUID | None = None
    ) -> Resources:
        engine = build_engine(settings)
        return cls(settings, build_sessionmaker(engine), redis, engine, worker_id)

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session that commits when the block ends without an exception; webhook
        deliveries it wrote are then sent (the delivery job is queued after the commit)."""
        async with self.sessionmaker() as session:
            yield session
            await session.commit()
            jobs = JobQueue()
            queue_delivery_if_emitted(session, jobs)
            await jobs.flush(self.redis)


def resources(ctx: JobContext) -> Resources:
    found: Resources = ctx[RESOURCES]
    return found


class JobFailed(Exception):
    """A failure already phrased for the operator; `user`: the owner's words, when the
    operator's name infrastructure."""

    def __init__(self, message: str, user: str | None = None) -> None:
        super().__init__(message)
        self.user = user


# libvirt failures that speak of the owner's VM only: both views read them as they are.
_VM_ONLY = (
    virt.DomainNotRunning,
    virt.DomainStopped,
    virt.DomainNotFound,
    virt.DiskBusy,
    virt.CheckpointBroken,
)


SCRATCH_FULL = (
    "The hypervisor had too little scratch space for what the VM wrote during the backup; the "
    "backup was stopped so that the VM's own writes never failed"
)


def describe(exc: BaseException) -> Words:
    """The words a failed backup, restore or verification records, in both views."""
    if isinstance(exc, StorageFull):
        if exc.needed is not None and exc.free is not None:
            return Words(
                "Backup storage is full",
                f"Backup storage is full: about {size_human(exc.needed)} needed, "
                f"{size_human(exc.free)} free",
            )
        return Words("Backup storage is full", f"Backup storage is full: {exc}")
    if isinstance(exc, StorageUnreachable):
        return Words("Backup storage is unreachable", f"Backup storage is unreachable: {exc}")
    if isinstance(exc, StorageError):
        return Words("Backup storage error", f"Backup storage error: {exc}")
    if isinstance(exc, virt.ScratchFull):
        return Words(SCRATCH_FULL, str(exc))
    if isinstance(exc, (*_VM_ONLY, ChainError, NotRecorded)):
        return Words(str(exc))
    if isinstance(exc, SecretsUndecryptable):
        return Words("Backup storage error", exc.detail)
    if isinstance(exc, JobFailed):
        return Words(exc.user or str(exc), str(exc))
    if isinstance(exc, virt.VirtError):
        return Words("The hypervisor reported an error", str(exc))
    return Words(
        "An unexpected error occurred; the operators can see what it was",
        f"Unexpected error ({type(exc).__name__}): {exc}",
    )


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(
            ctypes.util.find_library("c") or "libc.so.6"
        ).malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to ask
        return None
    return trim


_malloc_trim = _load_malloc_trim()


def give_back_memory() -> None:
    """After a job: a backup's buffers (image pieces, upload parts, HTTP bodies) are freed,
    but glibc keeps freed pages in its arenas, one per thread that allocated. Hand them back,
    so an idle worker's RSS returns near where it was (after an S3 backup it stayed ~100 MB
    higher: 92 MB loaded, 199 after the job, 136 after this)."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


# Failures of the outside world, described without a traceback in the log.
EXPECTED = (virt.VirtError, StorageError, JobFailed, ChainError, NotRecorded, SecretsUndecryptable)


@dataclass
class Progress:
    """What a running job tells: its percent for the API; for the metrics, its type (a
    backup's full or incremental as decided, a restore's target) and the bytes it moved."""

    percent: int = 0
    type: str = "unknown"  # until the job has loaded its row
    bytes: int | None = None
    log: ProgressLog | None = None  # logs how far it is every PROGRESS_EVERY_S

    def advance(self, done: int, total: int, share: int = 100) -> None:
        """`done` of `total` bytes moved: the job's percent (`share` of 100 for this part of
        the work), and a progress line in the log when it is time."""
        self.percent = share * done // total if total else 0
        if self.log is not None:
            self.log.advance(done, total)


async def job_log_ids(
    session: AsyncSession, job: str, model: type[Backup] | type[Restore], row_id: uuid.UUID
) -> dict[str, object]:
    """The ids every log line of a job on this row carries (app.logs.JOB_FIELDS): the row's,
    and its instance's, policy's and hypervisor's. A restore's policy is its backup's."""
    stmt = select(
        model.instance_id,
        Instance.hypervisor_id,
        func.coalesce(Backup.policy_id, Instance.backup_policy_id),
    ).select_from(model)
    if model is Restore:
        stmt = stmt.outerjoin(Backup, Backup.id == Restore.backup_id)
    stmt = stmt.join(Instance, Instance.id == model.instance_id).where(model.id == row_id)
    row = (await session.execute(stmt)).one_or_none()
    own = "restore_id" if model is Restore else "backup_id"
    ids: dict[str, object] = {"job": job, own: row_id}
    if row is not None:
        ids.update(instance_id=row[0], hypervisor_id=row[1], policy_id=row[2])
    return ids


W = TypeVar("W")
T = TypeVar("T")


async def until_recorded(what: str, write: Callable[[], Awaitable[T]]) -> T:
    """Run `write` (which opens its own session) until PostgreSQL takes it.

    The work it records is done (the bytes are stored, the disk is replaced): losing the
    outcome to a database restart would orphan it. While the database is unreachable the
    write is tried again with backoff; the job's own timeout bounds the wait. Any other error
    is the write's own and is raised.
    """
    delay = RECORD_RETRY_FIRST_S
    while True:
        try:
            return await write()
        except Exception as exc:
            if not database_unreachable(exc):
                raise
            log.warning("%s: the database is unreachable (%s); retrying in %.1fs", what, exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECORD_RETRY_MAX_S)


class Job(Generic[W]):
    """A job on the row of `model` (a Backup or a Restore). Subclasses fill in the hooks."""

    model: type[Backup] | type[Restore]
    name: str  # "backup", "restore": for the log
    interrupted: str  # the row's error when the worker stopped during the job
    heartbeat = True  # keep heartbeat_at and progress on the row while running
    metrics: JobMetrics | None = None  # counted once the outcome is recorded

    async def run(self, ctx: JobContext, row_id: str) -> str:
        res, rid = resources(ctx), uuid.UUID(row_id)
        async with res.session() as session:
            ids = await self.log_ids(session, rid)
        with job_context(**ids):
            return await self._run(ctx, res, rid)

    async def log_ids(self, session: AsyncSession, row_id: uuid.UUID) -> dict[str, object]:
        return await job_log_ids(session, self.name, self.model, row_id)

    async def _run(self, ctx: JobContext, res: Resources, rid: uuid.UUID) -> str:
        row_id = str(rid)
        if not await self.claim(res, rid, ctx.get("job_try", 1)):
            log.info("%s %s not started: not pending, refused or recovered", self.name, row_id)
            return "not pending"
        log.info("%s %s started", self.name, row_id)
        started = time.monotonic()
        progress = Progress(log=ProgressLog(log, self.name))
        heartbeat = (
            asyncio.create_task(self._keep_alive(res, rid, progress)) if self.heartbeat else None
        )
        work: W | None = None
        try:
            async with res.session() as session:
                work = await self.load(session, rid)
            progress.type = self.type_of(work)
            done = await self.execute(res, work, progress)
            self._count(progress, COMPLETED, started)
            log.info("%s %s %s in %.1fs", self.name, row_id, done, time.monotonic() - started)
            return done
        except BaseException as exc:
            words = describe(exc) if isinstance(exc, Exception) else Words(self.interrupted)
            if not isinstance(exc, EXPECTED):
                log.exception("%s %s failed", self.name, row_id)
            else:
                log.warning("%s %s failed: %s", self.name, row_id, words.operator or words.user)

            async def record() -> None:
                async with res.session() as session:
                    await self.fail(session, rid, words)

            recording = until_recorded(f"{self.name} {row_id}: recording the failure", record)
            if isinstance(exc, Exception):
                await recording
                self._count(progress, FAILED, started)
                return f"failed: {words.operator or words.user}"
            # Cancelled (the worker stopping): a stop must not hang on a database outage; a
            # row left in progress is recovered by the hypervisor's next worker.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(recording, STOPPING_RECORD_S)
                self._count(progress, FAILED, started)
            raise  # arq must see the cancellation
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
            if work is not None:
                await self.cleanup(work)
            give_back_memory()

    def _count(self, progress: Progress, status: str, started: float) -> None:
        if self.metrics is not None:
            seconds = time.monotonic() - started
            self.metrics.finished(progress.type, status, seconds, progress.bytes)

    async def claim(self, res: Resources, row_id: uuid.UUID, job_try: int) -> bool:
        """pending -> in_progress, unless the instance is busy with other running work. A row
        found in progress on a retry was left by a dead worker: recover, then fail it."""
        model = self.model
        async with res.session() as session:
            instance_id = await session.scalar(select(model.instance_id).where(model.id == row_id))
            if instance_id is None:
                return False
            # Shared by every job's claim: one job of an instance starts at a time.
            await session.execute(
                select(Instance.id).where(Instance.id == instance_id).with_for_update()
            )
            status = await session.scalar(select(model.status).where(model.id == row_id))
            if status == BackupStatus.IN_PROGRESS and job_try > 1:
                row = await session.get(model, row_id)
                assert row is not None
                await self._abandon(session, row)
                return False
            if status != BackupStatus.PENDING:
                return False
            if work := await busy(session, instance_id, running_only=True, besides=row_id):
                await self.refuse(session, row_id, work)
                return False
            started = now()
            claimed = await session.scalar(
                update(model)
                .where(model.id == row_id, model.status == BackupStatus.PENDING)
                .values(
                    status=BackupStatus.IN_PROGRESS,
                    started_at=started,
                    heartbeat_at=started,
                    progress=0,
                    worker_id=res.worker_id,
                )
                .returning(model.id)
            )
            return claimed is not None

    async def abandon_orphan(self, res: Resources, row_id: uuid.UUID) -> bool:
        """A row left in progress by a worker that is gone: clean up what that worker left
        (libvirt job, checkpoint, work files, partial uploads) and fail it. False when the row
        turned out to be in a live worker's hands after all."""
        async with res.session() as session:
            ids = await self.log_ids(session, row_id)
        with job_context(**ids):
            if not await self._abandon_orphan(res, row_id):
                return False
            log.warning("%s %s: its worker is gone; cleaned up and failed", self.name, row_id)
        return True

    async def _abandon_orphan(self, res: Resources, row_id: uuid.UUID) -> bool:
        async with res.session() as session:
            row: Any = await session.get(self.model, row_id, with_for_update=True)
            if row is None or row.status != BackupStatus.IN_PROGRESS:
                return False
            if not await session.scalar(
                select(self.model.id).where(self.model.id == row_id, unattended(self.model, now()))
            ):
                return False
            await self._abandon(session, row)
        return True

    async def _abandon(self, session: AsyncSession, row: Any) -> None:
        await self.recover(session, row)
        await self.fail(session, row.id, Words(self.interrupted))

    async def fail(self, session: AsyncSession, row_id: uuid.UUID, words: Words) -> Any:
        """Mark the row failed (if it still is pending or in progress); the failed row or None."""
        model = self.model
        return await session.scalar(
            update(model)
            .where(model.id == row_id, model.status.in_(ACTIVE))
            .values(
                status=BackupStatus.FAILED, completed_at=now(), progress=None, **words.columns()
            )
            .returning(model)
        )

    async def _keep_alive(self, res: Resources, row_id: uuid.UUID, progress: Progress) -> None:
        """Every HEARTBEAT_S: heartbeat_at and progress (0-99), so the reaper can tell a live
        job from a lost one. Nothing stops it but the job's end: a beat that fails (the
        database restarting) is logged, and the next one tries again."""
        model = self.model
        failing = False
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                async with res.session() as session:
                    await session.execute(
                        update(model)
                        .where(model.id == row_id, model.status == BackupStatus.IN_PROGRESS)
                        .values(heartbeat_at=utcnow(), progress=min(99, progress.percent))
                    )
            except Exception as exc:
                if not failing:
                    log.warning("%s %s: heartbeat failed (%s); retrying", self.name, row_id, exc)
                failing = True
                continue
            if failing:
                log.info("%s %s: heartbeat restored", self.name, row_id)
            failing = False

    # --- hooks ---------------------------------------------------------------------------

    async def refuse(self, session: AsyncSession, row_id: uuid.UUID, work: Busy) -> None:
        """The instance is busy with `work`: fail the row, saying so."""
        raise NotImplementedError

    async def recover(self, session: AsyncSession, row: Any) -> None:
        """Remove what a dead worker left of this job (libvirt jobs, work files)."""
        raise NotImplementedError

    async def load(self, session: AsyncSession, row_id: uuid.UUID) -> W:
        raise NotImplementedError

    def type_of(self, work: W) -> str:
        """The job's type for the metrics, as loaded (execute may refine it in progress)."""
        return "unknown"

    async def execute(self, res: Resources, work: W, progress: Progress) -> str:
        raise NotImplementedError

    async def cleanup(self, work: W) -> None:
        """Runs after the job, whatever its outcome."""
