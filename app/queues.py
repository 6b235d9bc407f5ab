"""The arq queues (one control queue, one per hypervisor) and the jobs sent to them.

Every job has a fixed id derived from its row, so arq drops a second copy while the first is
queued, running or its result kept, and the scheduler tick can send again the jobs of rows
still waiting (see app.engine.lifecycle.redispatch_lost_jobs).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from arq.connections import ArqRedis

log = logging.getLogger(__name__)

FLUSH_CONCURRENCY = 100


@dataclass(frozen=True)
class Job:
    function: str
    args: tuple[Any, ...]
    job_id: str | None
    queue_name: str
    # The row it works on says it is still waiting, and the scheduler tick sends the jobs of
    # such rows again (app.engine.lifecycle.redispatch_lost_jobs): losing this enqueue only
    # delays the work.
    redispatched: bool = False
    defer_s: float | None = None  # run no sooner than this many seconds from now


@dataclass
class JobQueue:
    """Jobs a request wants enqueued; sent only after its transaction committed."""

    jobs: list[Job] = field(default_factory=list)

    def add(
        self,
        function: str,
        *args: Any,
        queue_name: str,
        job_id: str | None = None,
        redispatched: bool = False,
        defer_s: float | None = None,
    ) -> None:
        self.jobs.append(Job(function, args, job_id, queue_name, redispatched, defer_s))

    async def flush(self, redis: ArqRedis | None) -> None:
        """Enqueue everything; a job the tick sends again may fail to enqueue (logged), others
        raise (the request answers 503: nothing durable says the work is wanted)."""
        jobs, self.jobs = self.jobs, []
        if redis is None:
            return
        # Each enqueue is a few round trips; a tick may send a thousand, so overlap them.
        for start in range(0, len(jobs), FLUSH_CONCURRENCY):
            batch = jobs[start : start + FLUSH_CONCURRENCY]
            outcomes = await asyncio.gather(
                *(
                    redis.enqueue_job(
                        job.function,
                        *job.args,
                        _job_id=job.job_id,
                        _queue_name=job.queue_name,
                        _defer_by=job.defer_s,
                    )
                    for job in batch
                ),
                return_exceptions=True,
            )
            for job, outcome in zip(batch, outcomes, strict=True):
                if not isinstance(outcome, BaseException):
                    continue
                if not (job.redispatched and isinstance(outcome, Exception)):
                    raise outcome
                log.warning(
                    "could not queue %s (%s: %s); the scheduler tick will send it again",
                    job.job_id or job.function,
                    type(outcome).__name__,
                    outcome,
                )


CONTROL_QUEUE = "ibp:control"


def hypervisor_queue(hypervisor_id: uuid.UUID | str) -> str:
    return f"ibp:hypervisor:{hypervisor_id}"


def _on_hypervisor(
    jobs: JobQueue,
    function: str,
    kind: str,
    row_id: uuid.UUID,
    hypervisor_id: uuid.UUID,
    redispatched: bool,
) -> None:
    # These run on the instance's hypervisor: its worker has libvirt, scratch space, qemu-img.
    jobs.add(
        function,
        str(row_id),
        queue_name=hypervisor_queue(hypervisor_id),
        job_id=f"{kind}:{row_id}",
        redispatched=redispatched,
    )


def enqueue_backup(jobs: JobQueue, backup_id: uuid.UUID, hypervisor_id: uuid.UUID) -> None:
    _on_hypervisor(jobs, "run_backup", "backup", backup_id, hypervisor_id, redispatched=True)


def enqueue_restore(jobs: JobQueue, restore_id: uuid.UUID, hypervisor_id: uuid.UUID) -> None:
    _on_hypervisor(jobs, "run_restore", "restore", restore_id, hypervisor_id, redispatched=True)


def enqueue_verify(jobs: JobQueue, backup_id: uuid.UUID, hypervisor_id: uuid.UUID) -> None:
    # No row records a requested verify: a lost enqueue must fail the request instead.
    _on_hypervisor(jobs, "verify_backup", "verify", backup_id, hypervisor_id, redispatched=False)


def enqueue_deletion(jobs: JobQueue, backup_id: uuid.UUID) -> None:
    jobs.add(
        "delete_backup_files",
        str(backup_id),
        queue_name=CONTROL_QUEUE,
        job_id=f"delete:{backup_id}",
        redispatched=True,
    )


def enqueue_storage_check(jobs: JobQueue, storage_id: uuid.UUID, hypervisor_id: uuid.UUID) -> None:
    """Checks run on a hypervisor's worker, where backups reach the storage. The fixed id
    keeps repeated clicks to one queued check; a lost enqueue fails the request (no tick sends
    it again: the storage says `checking`, and checking again sends a new job)."""
    jobs.add(
        "check_storage",
        str(storage_id),
        queue_name=hypervisor_queue(hypervisor_id),
        job_id=f"check:{storage_id}",
    )


def enqueue_webhook_delivery(
    jobs: JobQueue, defer_s: float | None = None, job_id: str | None = None
) -> None:
    """Send the webhook deliveries that are due. No fixed id by default: each run claims what
    is due at its start, so a run queued while another runs still sends what was written
    since. Lost, it only delays them: the tick queues a run while deliveries are due."""
    jobs.add(
        "deliver_webhooks",
        queue_name=CONTROL_QUEUE,
        job_id=job_id,
        redispatched=True,
        defer_s=defer_s,
    )
