"""A stand-in for the hypervisor's backup job, for scheduler tests without VMs.

It does what the real job does to the catalog (claim, chain and parent, complete, retention,
policy status) but takes no disk image, so 60 simulated days run in seconds.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.engine.chains import chain_states
from app.engine.lifecycle import apply_retention, record_success
from app.models import Backup, BackupChain, BackupPolicy
from app.queues import JobQueue


async def complete_pending(
    sessionmaker: async_sessionmaker[AsyncSession],
    now: datetime,
    fail: set[uuid.UUID] = frozenset(),  # type: ignore[assignment]
) -> list[Backup]:
    done: list[Backup] = []
    async with sessionmaker() as session:
        pending = (
            await session.scalars(
                select(Backup).where(Backup.status == "pending").order_by(Backup.created_at)
            )
        ).all()
        for backup in pending:
            chains = await chain_states(session, [backup.instance_id])
            chain = chains[backup.instance_id]
            if backup.instance_id in fail:
                backup.status = "failed"
                backup.error = "simulated failure"
                backup.completed_at = now
                done.append(backup)
                continue
            if backup.type == "incremental":
                assert chain.chain_id is not None and chain.tip_id is not None
                backup.chain_id, backup.parent_id = chain.chain_id, chain.tip_id
            else:
                new_chain = BackupChain(
                    id=uuid.uuid4(),
                    instance_id=backup.instance_id,
                    policy_id=backup.policy_id,
                    backup_device=backup.backup_device,
                    disks=[],
                    created_at=now,
                )
                session.add(new_chain)
                await session.flush()
                backup.chain_id = new_chain.id
            backup.status = "completed"
            backup.checkpoint_name = f"ibp-{backup.id}"
            backup.size_bytes = 1024
            backup.completed_at = now
            await session.flush()
            if backup.type == "full" and backup.policy_id is not None:
                policy = await session.get(BackupPolicy, backup.policy_id)
                assert policy is not None
                await apply_retention(
                    session, backup.instance_id, policy.retention_count, backup.chain_id, JobQueue()
                )
            await record_success(session, backup)
            done.append(backup)
        # What the deletion job does once storage confirms: rows go, empty chains go.
        await session.execute(delete(Backup).where(Backup.status == "deleting"))
        await session.execute(
            delete(BackupChain).where(
                ~select(Backup.id).where(Backup.chain_id == BackupChain.id).exists()
            )
        )
        await session.commit()
    return done
