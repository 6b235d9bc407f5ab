"""The arq queues (one control queue, one per hypervisor) and the jobs sent to them.

Every job has a fixed id derived from its row, so arq drops a second copy while the first is
queued, running or its result kept, and the scheduler tick can send again the jobs of rows
still waiting (see app.backups.lifecycle.redispatch_lost_jobs).
"""

from __future__ import annotations

import uuid

from app.db import JobQueue

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
