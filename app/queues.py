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


def enqueue_backup(jobs: JobQueue, backup_id: uuid.UUID, hypervisor_id: uuid.UUID) -> None:
    jobs.add(
        "run_backup",
        str(backup_id),
        queue_name=hypervisor_queue(hypervisor_id),
        job_id=f"backup:{backup_id}",
        redispatched=True,
    )


def enqueue_restore(jobs: JobQueue, restore_id: uuid.UUID, hypervisor_id: uuid.UUID) -> None:
    jobs.add(
        "run_restore",
        str(restore_id),
        queue_name=hypervisor_queue(hypervisor_id),
        job_id=f"restore:{restore_id}",
        redispatched=True,
    )


def enqueue_deletion(jobs: JobQueue, backup_id: uuid.UUID) -> None:
    jobs.add(
        "delete_backup_files",
        str(backup_id),
        queue_name=CONTROL_QUEUE,
        job_id=f"delete:{backup_id}",
        redispatched=True,
    )
