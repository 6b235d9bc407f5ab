"""Where each instance's backup chain stands, read from the catalog in a few batch queries."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Backup, BackupChain, Restore
from app.scheduling import ChainInfo, ChainState

RESTORED = "instance was restored from a backup"
ACTIVE = ("pending", "in_progress")


@dataclass(frozen=True)
class InstanceChain:
    """The instance's current chain: what planning needs and what an incremental builds on."""

    state: ChainState | None  # None: the instance has never had a backup
    chain_id: uuid.UUID | None
    tip_id: uuid.UUID | None  # newest completed backup of the chain: an incremental's parent
    tip_checkpoint: str | None
    backup_device: str | None
    disks: list[dict[str, object]]
    busy: bool  # a backup or a restore is pending or in progress


DEVICE_CHANGED = "backup device setting changed"


def planning_state(chain: InstanceChain, backup_device: str) -> ChainState | None:
    """The chain state to plan with: a chain of other disks cannot take an incremental."""
    state = chain.state
    if state is not None and state.base_usable and chain.backup_device != backup_device:
        return ChainState(state.incrementals, False, DEVICE_CHANGED)
    return state


async def chain_states(
    session: AsyncSession, instance_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, InstanceChain]:
    if not instance_ids:
        return {}
    ids = list(instance_ids)
    latest_full = (
        select(Backup.instance_id, Backup.chain_id, Backup.created_at)
        .where(Backup.instance_id.in_(ids), Backup.type == "full", Backup.status == "completed")
        .ext(distinct_on(Backup.instance_id))
        .order_by(Backup.instance_id, Backup.created_at.desc())
    )
    fulls = {r.instance_id: r for r in (await session.execute(latest_full)).all()}
    latest_attempt = (
        select(Backup.instance_id, Backup.status, Backup.created_at)
        .where(
            Backup.instance_id.in_(ids),
            Backup.type == "full",
            Backup.status.in_(("completed", "failed")),
        )
        .ext(distinct_on(Backup.instance_id))
        .order_by(Backup.instance_id, Backup.created_at.desc())
    )
    attempts = {r.instance_id: r for r in (await session.execute(latest_attempt)).all()}
    busy = set(
        (
            await session.scalars(
                select(Backup.instance_id)
                .where(Backup.instance_id.in_(ids), Backup.status.in_(ACTIVE))
                .distinct()
            )
        ).all()
    )
    # A restore and a backup of one instance never run at the same time.
    busy |= set(
        (
            await session.scalars(
                select(Restore.instance_id)
                .where(Restore.instance_id.in_(ids), Restore.status.in_(ACTIVE))
                .distinct()
            )
        ).all()
    )
    # An in-place restore rewrote the disk: the checkpoints no longer describe it.
    restored = {
        r.instance_id: r.completed_at
        for r in (
            await session.execute(
                select(Restore.instance_id, Restore.completed_at)
                .where(
                    Restore.instance_id.in_(ids),
                    Restore.target == "in_place",
                    Restore.status == "completed",
                )
                .ext(distinct_on(Restore.instance_id))
                .order_by(Restore.instance_id, Restore.completed_at.desc().nulls_last())
            )
        ).all()
    }
    chain_ids = [r.chain_id for r in fulls.values() if r.chain_id is not None]
    tips: dict[uuid.UUID, tuple[uuid.UUID, str | None, datetime | None]] = {}
    incrementals: dict[uuid.UUID, int] = {}
    chains: dict[uuid.UUID, BackupChain] = {}
    if chain_ids:
        tip_rows = (
            select(Backup.chain_id, Backup.id, Backup.checkpoint_name, Backup.completed_at)
            .where(Backup.chain_id.in_(chain_ids), Backup.status == "completed")
            .ext(distinct_on(Backup.chain_id))
            .order_by(Backup.chain_id, Backup.created_at.desc())
        )
        for r in (await session.execute(tip_rows)).all():
            if r.chain_id is not None:
                tips[r.chain_id] = (r.id, r.checkpoint_name, r.completed_at)
        count_rows = (
            select(Backup.chain_id, func.count())
            .where(
                Backup.chain_id.in_(chain_ids),
                Backup.type == "incremental",
                Backup.status == "completed",
            )
            .group_by(Backup.chain_id)
        )
        incrementals = {
            r[0]: int(r[1]) for r in (await session.execute(count_rows)).all() if r[0] is not None
        }
        for chain in await session.scalars(
            select(BackupChain).where(BackupChain.id.in_(chain_ids))
        ):
            chains[chain.id] = chain

    result: dict[uuid.UUID, InstanceChain] = {}
    for instance_id in ids:
        full = fulls.get(instance_id)
        attempt = attempts.get(instance_id)
        is_busy = instance_id in busy
        if full is None or full.chain_id is None:
            state = None
            if attempt is not None:  # only failed fulls so far
                state = ChainState(0, False, "previous full backup failed")
            result[instance_id] = InstanceChain(state, None, None, None, None, [], is_busy)
            continue
        found = chains.get(full.chain_id)
        tip_id, tip_checkpoint, tip_done = tips.get(full.chain_id, (None, None, None))
        usable = attempt is None or attempt.status == "completed"
        reason = None if usable else "previous full backup failed"
        restored_at = restored.get(instance_id)
        if usable and restored_at is not None and (tip_done is None or restored_at > tip_done):
            usable, reason = False, RESTORED
        state = ChainState(incrementals.get(full.chain_id, 0), usable, reason)
        result[instance_id] = InstanceChain(
            state=state,
            chain_id=full.chain_id,
            tip_id=tip_id,
            tip_checkpoint=tip_checkpoint,
            backup_device=found.backup_device if found else None,
            disks=list(found.disks) if found else [],
            busy=is_busy,
        )
    return result


async def completed_chains(session: AsyncSession, instance_id: uuid.UUID) -> list[ChainInfo]:
    """The instance's chains whose full completed (what retention counts), oldest first."""
    rows = (
        await session.execute(
            select(BackupChain.id, func.min(Backup.created_at))
            .join(Backup, Backup.chain_id == BackupChain.id)
            .where(
                BackupChain.instance_id == instance_id,
                Backup.type == "full",
                Backup.status == "completed",
            )
            .group_by(BackupChain.id)
            .order_by(func.min(Backup.created_at))
        )
    ).all()
    return [ChainInfo(id=r[0], started_at=r[1], full_completed=True) for r in rows]


async def active_work(session: AsyncSession, instance_id: uuid.UUID) -> str | None:
    """Why the instance cannot start a backup or a restore now, or None when it can."""
    backup = await session.scalar(
        select(Backup.status)
        .where(Backup.instance_id == instance_id, Backup.status.in_(ACTIVE))
        .limit(1)
    )
    if backup is not None:
        return f"A backup of this instance is {backup.replace('_', ' ')}"
    restore = await session.scalar(
        select(Restore.status)
        .where(Restore.instance_id == instance_id, Restore.status.in_(ACTIVE))
        .limit(1)
    )
    if restore is not None:
        return f"A restore of this instance is {restore.replace('_', ' ')}"
    return None
