"""Restores as users see them: scoped reads and the rules for starting one."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.backups.service import get_backup_row
from app.engine.chains import busy
from app.errors import Conflict, NotFound
from app.instances.service import get_instance
from app.models import Instance, Restore, User
from app.queues import JobQueue, enqueue_restore
from app.restores.schemas import RestoreRead
from app.values import BackupStatus, InstanceStatus, RestoreStatus, RestoreTarget


def readable_restores(user: User) -> Select[Restore]:
    """Every restore query goes through here: users see restores of their own instances."""
    stmt = select(Restore).join(Instance, Instance.id == Restore.instance_id)
    if not user.is_admin:
        stmt = stmt.where(Instance.owner_id == user.id)
    return stmt


def list_statement(user: User, instance_id: uuid.UUID) -> Select[Restore]:
    return (
        readable_restores(user)
        .where(Restore.instance_id == instance_id)
        .order_by(Restore.created_at.desc(), Restore.id)
    )


async def get_restore(session: AsyncSession, user: User, restore_id: uuid.UUID) -> Restore:
    restore = await session.scalar(readable_restores(user).where(Restore.id == restore_id))
    if restore is None:
        raise NotFound("Restore not found")
    return restore


async def start_restore(
    session: AsyncSession,
    user: User,
    backup_id: uuid.UUID,
    target: RestoreTarget,
    jobs: JobQueue,
) -> Restore:
    backup, _, _ = await get_backup_row(session, user, backup_id)
    # The instance row lock serialises concurrent requests (restore, Backup now) per instance.
    instance = await get_instance(session, user, backup.instance_id, for_update=True)
    if backup.status != BackupStatus.COMPLETED:
        raise Conflict(f"Only completed backups can be restored (this one is {backup.status})")
    if target == RestoreTarget.IN_PLACE and instance.status != InstanceStatus.STOPPED:
        raise Conflict(
            f"Instance must be stopped for an in-place restore (status: {instance.status})"
        )
    if (work := await busy(session, instance.id)) is not None:
        raise Conflict(f"{work}; try again when it has finished")
    restore = Restore(
        id=uuid.uuid4(),
        backup_id=backup.id,
        instance_id=instance.id,
        requested_by=user.id,
        target=target,
        status=RestoreStatus.PENDING,
        result={},
        created_at=datetime.now(UTC),
    )
    session.add(restore)
    await session.flush()
    enqueue_restore(jobs, restore.id, instance.hypervisor_id)
    return restore


def to_read(restore: Restore, viewer: User) -> RestoreRead:
    """Only admins read the operator's detail of an error."""
    detail = (restore.error_detail or restore.error) if viewer.is_admin else None
    return RestoreRead.model_validate(restore).model_copy(update={"error_detail": detail})
