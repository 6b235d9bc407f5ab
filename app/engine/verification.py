"""Verification outcomes, and which chains are due for their periodic check."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from app.engine.words import Words
from app.models import Backup, Instance
from app.values import BackupStatus

DUE_BATCH = 500  # per tick: the rest are picked up by the next ticks


async def due_for_verification(
    session: AsyncSession, now: datetime, interval: timedelta
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(backup id, hypervisor id) of each instance's newest completed backup whose chain has
    not been verified within ``interval``; at most DUE_BATCH rows."""
    newest = (
        select(Backup.id, Backup.chain_id, Backup.instance_id)
        .where(Backup.status == BackupStatus.COMPLETED, Backup.chain_id.is_not(None))
        .ext(distinct_on(Backup.instance_id))
        .order_by(Backup.instance_id, Backup.created_at.desc())
        .subquery()
    )
    checked = aliased(Backup)
    recently_checked = (
        select(checked.id)
        .where(checked.chain_id == newest.c.chain_id, checked.verified_at >= now - interval)
        .exists()
    )
    rows = (
        await session.execute(
            select(newest.c.id, Instance.hypervisor_id)
            .join(Instance, Instance.id == newest.c.instance_id)
            .where(~recently_checked)
            .limit(DUE_BATCH)
        )
    ).all()
    return [(r[0], r[1]) for r in rows]


async def record_verification(
    session: AsyncSession,
    backup_id: uuid.UUID,
    now: datetime,
    error: Words | None,
    culprit: uuid.UUID | None = None,
) -> None:
    """The verified backup gets the outcome; a corrupt chain member is marked bad as well,
    so a backup once verified good is never silently kept as good."""
    if error is None:
        columns: dict[str, str | None] = {"verify_error": None, "verify_error_detail": None}
    else:
        columns = error.columns("verify_error")
    await session.execute(
        update(Backup)
        .where(Backup.id == backup_id)
        .values(verified_at=now, verify_ok=error is None, **columns)
    )
    if error is not None and culprit is not None and culprit != backup_id:
        await session.execute(
            update(Backup)
            .where(Backup.id == culprit)
            .values(verified_at=now, verify_ok=False, **columns)
        )
