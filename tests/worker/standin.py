"""A stand-in for the hypervisor's backup job, for scheduler tests without VMs.

It stores no disk image; everything else is the real job's catalog code: the chain state, the
job's last check (app.scheduling.decide) and the completion (app.engine.lifecycle:
record_completion, with retention and the policy's status). So 60 simulated days run in seconds.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.engine.chains import chain_states
from app.engine.lifecycle import record_completion
from app.models import Backup, BackupChain
from app.queues import JobQueue
from app.scheduling import decide


async def complete_pending(
    sessionmaker: async_sessionmaker[AsyncSession],
    now: datetime,
) -> list[Backup]:
    done: list[Backup] = []
    async with sessionmaker() as session:
        pending = (
            await session.scalars(
                select(Backup).where(Backup.status == "pending").order_by(Backup.created_at)
            )
        ).all()
        for backup in pending:
            backup.status, backup.started_at = "in_progress", now
            await session.flush()
            chain = (await chain_states(session, [backup.instance_id]))[backup.instance_id]
            checkpoints = [chain.tip_checkpoint] if chain.tip_checkpoint else []
            decision = decide(
                backup.type,
                backup.chain_reset_reason,
                chain,
                backup.backup_device,
                chain.storage_id,
                {},  # no disks: the chain's disk set stays the same (empty) one
                checkpoints,
                uuid.uuid4(),
            )
            completed = await record_completion(
                session, backup.id, decision, [], None, f"ibp-{backup.id}", [], now, JobQueue()
            )
            done.append(completed)
        # What the deletion job does once storage confirms: rows go, empty chains go.
        await session.execute(delete(Backup).where(Backup.status == "deleting"))
        await session.execute(
            delete(BackupChain).where(
                ~select(Backup.id).where(Backup.chain_id == BackupChain.id).exists()
            )
        )
        await session.commit()
    return done
