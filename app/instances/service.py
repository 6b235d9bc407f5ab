"""Instances (VMs) as the platform reports them; users read their own, admins manage all."""

from __future__ import annotations

import uuid

from sqlalchemy import Select, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from app.db import flush_or_conflict
from app.engine.chains import busy
from app.engine.lifecycle import mark_for_deletion, remove_instance
from app.engine.policy_state import instance_left, refresh_policies_of
from app.errors import Conflict, NotFound, Unprocessable
from app.instances.schemas import InstanceCreate, InstanceUpdate
from app.models import Backup, Hypervisor, Instance, InstanceDisk, User
from app.models.base import utcnow
from app.queues import JobQueue
from app.values import BackupStatus


def readable_instances(user: User) -> Select[Instance]:
    """Every instance query goes through here: users see only their own rows, and nobody an
    instance being deleted with its backups."""
    stmt = select(Instance).where(Instance.deleting_at.is_(None))
    if not user.is_admin:
        stmt = stmt.where(Instance.owner_id == user.id)
    return stmt


def list_statement(
    user: User, owner_id: uuid.UUID | None, status: str | None, protection: str | None = None
) -> Select[Instance]:
    stmt = readable_instances(user).options(selectinload(Instance.disks))
    if owner_id is not None:
        stmt = stmt.where(Instance.owner_id == owner_id)
    if status is not None:
        stmt = stmt.where(Instance.status == status)
    if protection is not None:
        stmt = stmt.where(Instance.protection == protection)
    return stmt.order_by(Instance.created_at, Instance.id)


async def get_instance(
    session: AsyncSession, user: User, instance_id: uuid.UUID, *, for_update: bool = False
) -> Instance:
    stmt = (
        readable_instances(user)
        .where(Instance.id == instance_id)
        .options(selectinload(Instance.disks))
    )
    if for_update:
        stmt = stmt.with_for_update()
    instance = await session.scalar(stmt)
    if instance is None:
        raise NotFound("Instance not found")
    return instance


def _ref_error(field: str, message: str) -> Unprocessable:
    return Unprocessable(
        f"{field}: {message}", errors=[{"field": field, "message": message, "type": "reference"}]
    )


async def _check_refs(
    session: AsyncSession, owner_id: uuid.UUID | None, hypervisor_id: uuid.UUID | None
) -> None:
    if owner_id is not None and await session.get(User, owner_id) is None:
        raise _ref_error("owner_id", "no such user")
    if hypervisor_id is not None and await session.get(Hypervisor, hypervisor_id) is None:
        raise _ref_error("hypervisor_id", "no such hypervisor")


async def create_instance(session: AsyncSession, payload: InstanceCreate) -> Instance:
    await _check_refs(session, payload.owner_id, payload.hypervisor_id)
    instance = Instance(
        id=uuid.uuid4(),
        name=payload.name,
        owner_id=payload.owner_id,
        hypervisor_id=payload.hypervisor_id,
        domain_name=payload.domain_name,
        status=payload.status,
        disks=[InstanceDisk(id=uuid.uuid4(), **d.model_dump()) for d in payload.disks],
    )
    session.add(instance)
    await flush_or_conflict(
        session, "That hypervisor already has an instance with this domain name"
    )
    return instance


async def update_instance(
    session: AsyncSession, instance: Instance, payload: InstanceUpdate
) -> Instance:
    changes = payload.model_dump(exclude_unset=True, exclude={"disks", "transfer_backups"})
    changes = {k: v for k, v in changes.items() if v is not None}
    await _check_refs(session, changes.get("owner_id"), changes.get("hypervisor_id"))
    if "owner_id" in changes and changes["owner_id"] != instance.owner_id:
        # Backups hold the previous owner's data as it was: they change hands only on purpose.
        backups = await _backup_count(session, instance)
        if backups and not payload.transfer_backups:
            raise Conflict(
                f"The instance has {backups} backup(s), which would pass to the new owner; "
                "send transfer_backups: true to hand them over too, or delete them first"
            )
        if (left := instance.backup_policy_id) is not None:
            instance.backup_policy_id = None  # a policy never covers someone else's instance
            await instance_left(session, left, utcnow())
    # Another hypervisor (and storage) or other disks: its chain cannot go on.
    moved = changes.get("hypervisor_id", instance.hypervisor_id) != instance.hypervisor_id
    rechain = moved or payload.disks is not None
    for key, value in changes.items():
        setattr(instance, key, value)
    if payload.disks is not None:
        await session.execute(delete(InstanceDisk).where(InstanceDisk.instance_id == instance.id))
        instance.disks = [
            InstanceDisk(id=uuid.uuid4(), instance_id=instance.id, **d.model_dump())
            for d in payload.disks
        ]
    await flush_or_conflict(
        session, "That hypervisor already has an instance with this domain name"
    )
    if rechain:
        await refresh_policies_of(session, Instance.id == instance.id, utcnow())
    return instance


async def _backup_count(session: AsyncSession, instance: Instance) -> int:
    count = await session.scalar(
        select(func.count()).select_from(Backup).where(Backup.instance_id == instance.id)
    )
    return count or 0


async def delete_instance(
    session: AsyncSession, instance: Instance, delete_backups: bool, jobs: JobQueue
) -> list[uuid.UUID] | None:
    """None: the instance is gone. With its backups: the ids of the backups being deleted;
    the instance goes (hidden until then) when the deletion jobs have removed the last one's
    files, as `DELETE /backups/{id}?cascade=true` removes them."""
    backups = list(
        await session.execute(
            select(Backup.id, Backup.status).where(Backup.instance_id == instance.id)
        )
    )
    left = instance.backup_policy_id
    if not backups:
        await remove_instance(session, instance.id)
        if left is not None:
            await instance_left(session, left, utcnow())
        return None
    if not delete_backups:
        raise Conflict(
            f"Instance still has {len(backups)} backup(s); delete them first, or delete the "
            "instance with ?delete_backups=true to delete them too"
        )
    # A restore may be reading a chain, a backup writing one: deleting waits for them.
    if (work := await busy(session, instance.id)) is not None:
        raise Conflict(f"{work}; delete the instance when it finishes")
    instance.deleting_at = utcnow()
    instance.backup_policy_id = None  # no new scheduled backups meanwhile
    await mark_for_deletion(
        session, [b_id for b_id, status in backups if status != BackupStatus.DELETING], jobs
    )
    if left is not None:
        await instance_left(session, left, utcnow())
    return [b_id for b_id, _ in backups]
