"""Where each instance's backup chain stands, and whether it is busy: read from the catalog in
a few batch queries. What to do with it is decided in app.scheduling.plan."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, literal, select, union_all
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Backup, BackupChain, Restore
from app.scheduling import FILES_MISSING, FULL_FAILED, RESTORED, Chain, ChainInfo, ChainState
from app.values import ACTIVE, BackupStatus, BackupType, RestoreTarget


async def chain_states(
    session: AsyncSession, instance_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, Chain]:
    if not instance_ids:
        return {}
    ids = list(instance_ids)
    latest_full = (
        select(Backup.instance_id, Backup.chain_id, Backup.created_at)
        .where(
            Backup.instance_id.in_(ids),
            Backup.type == BackupType.FULL,
            Backup.status == BackupStatus.COMPLETED,
        )
        .ext(distinct_on(Backup.instance_id))
        .order_by(Backup.instance_id, Backup.created_at.desc())
    )
    fulls = {r.instance_id: r for r in (await session.execute(latest_full)).all()}
    latest_attempt = (
        select(Backup.instance_id, Backup.status, Backup.created_at)
        .where(
            Backup.instance_id.in_(ids),
            Backup.type == BackupType.FULL,
            Backup.status.in_((BackupStatus.COMPLETED, BackupStatus.FAILED)),
        )
        .ext(distinct_on(Backup.instance_id))
        .order_by(Backup.instance_id, Backup.created_at.desc())
    )
    attempts = {r.instance_id: r for r in (await session.execute(latest_attempt)).all()}
    busy = await busy_instances(session, ids)
    # An in-place restore rewrote the disk: the checkpoints no longer describe it.
    restored = {
        r.instance_id: r.completed_at
        for r in (
            await session.execute(
                select(Restore.instance_id, Restore.completed_at)
                .where(
                    Restore.instance_id.in_(ids),
                    Restore.target == RestoreTarget.IN_PLACE,
                    Restore.status == BackupStatus.COMPLETED,
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
    broken: set[uuid.UUID | None] = set()  # chains with a file found missing
    if chain_ids:
        tip_rows = (
            select(Backup.chain_id, Backup.id, Backup.checkpoint_name, Backup.completed_at)
            .where(Backup.chain_id.in_(chain_ids), Backup.status == BackupStatus.COMPLETED)
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
                Backup.type == BackupType.INCREMENTAL,
                Backup.status == BackupStatus.COMPLETED,
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
        broken = set(
            await session.scalars(
                select(Backup.chain_id).where(
                    Backup.chain_id.in_(chain_ids), Backup.files_missing_at.is_not(None)
                )
            )
        )

    result: dict[uuid.UUID, Chain] = {}
    for instance_id in ids:
        full = fulls.get(instance_id)
        attempt = attempts.get(instance_id)
        is_busy = instance_id in busy
        if full is None or full.chain_id is None:
            state = None
            if attempt is not None:  # only failed fulls so far
                state = ChainState(0, False, FULL_FAILED)
            result[instance_id] = Chain(state, busy=is_busy)
            continue
        found = chains.get(full.chain_id)
        tip_id, tip_checkpoint, tip_done = tips.get(full.chain_id, (None, None, None))
        usable = attempt is None or attempt.status == BackupStatus.COMPLETED
        reason = None if usable else FULL_FAILED
        restored_at = restored.get(instance_id)
        if usable and restored_at is not None and (tip_done is None or restored_at > tip_done):
            usable, reason = False, RESTORED
        if usable and full.chain_id in broken:
            usable, reason = False, FILES_MISSING
        state = ChainState(incrementals.get(full.chain_id, 0), usable, reason)
        result[instance_id] = Chain(
            state=state,
            chain_id=full.chain_id,
            tip_id=tip_id,
            tip_checkpoint=tip_checkpoint,
            backup_device=found.backup_device if found else None,
            disks=tuple(found.disks) if found else (),
            storage_id=found.storage_id if found else None,
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
                Backup.type == BackupType.FULL,
                Backup.status == BackupStatus.COMPLETED,
            )
            .group_by(BackupChain.id)
            .order_by(func.min(Backup.created_at))
        )
    ).all()
    return [ChainInfo(id=r[0], started_at=r[1], full_completed=True) for r in rows]


@dataclass(frozen=True)
class Busy:
    """Work that holds an instance: a backup or a restore, queued or running."""

    kind: str  # "backup" or "restore"
    status: str
    id: uuid.UUID  # of the backup or restore

    def __str__(self) -> str:
        return f"A {self.kind} of this instance is {self.status.replace('_', ' ')}"


async def busy_instances(
    session: AsyncSession,
    instance_ids: Collection[uuid.UUID],
    *,
    running_only: bool = False,
    besides: uuid.UUID | None = None,
) -> dict[uuid.UUID, Busy]:
    """The one answer to "is this instance busy?", for every caller.

    An instance with a backup or a restore queued or running takes no other backup, restore or
    delete. The jobs' own claims ask with `running_only` and `besides` (their own row): work
    queued beside them is serialised by the claims themselves, one at a time.
    """
    if not instance_ids:
        return {}
    statuses = (BackupStatus.IN_PROGRESS,) if running_only else ACTIVE
    parts = []
    for kind, model in (("backup", Backup), ("restore", Restore)):
        query = select(
            model.instance_id, literal(kind).label("kind"), model.status, model.id
        ).where(model.instance_id.in_(list(instance_ids)), model.status.in_(statuses))
        if besides is not None:
            query = query.where(model.id != besides)
        parts.append(query)
    rows = (await session.execute(union_all(*parts))).all()
    busy: dict[uuid.UUID, Busy] = {}
    # A running job says more than a queued one.
    for instance_id, kind, status, row_id in sorted(
        rows, key=lambda r: r[2] != BackupStatus.IN_PROGRESS
    ):
        busy.setdefault(instance_id, Busy(kind, status, row_id))
    return busy


async def busy(
    session: AsyncSession,
    instance_id: uuid.UUID,
    *,
    running_only: bool = False,
    besides: uuid.UUID | None = None,
) -> Busy | None:
    """busy_instances for one instance."""
    found = await busy_instances(session, [instance_id], running_only=running_only, besides=besides)
    return found.get(instance_id)
