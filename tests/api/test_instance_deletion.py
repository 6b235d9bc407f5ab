"""DELETE /instances/{id}?delete_backups=true: the instance goes with its backups, whose files
the deletion jobs remove first."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
from arq.connections import ArqRedis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings
from app.engine.storage_access import backup_prefix
from app.models import Backup, BackupChain, BackupFile, BackupStorage, Instance, Restore
from app.queues import CONTROL_QUEUE
from tests.api.helpers import admin_with_headers, assert_problem, user_with_headers
from tests.factories import (
    create_backup,
    create_chain,
    create_hypervisor,
    create_instance,
    create_policy,
    create_restore,
    create_user,
)
from worker.jobs import RESOURCES, Resources
from worker.tasks.deletion import delete_backup_files


async def _stored_chain(
    session: AsyncSession,
    instance: Instance,
    storage: BackupStorage,
    root: Path,
    statuses: list[str],
) -> list[Backup]:
    """A chain whose backups have their disk image and manifest on the local storage."""
    chain = await create_chain(session, instance, storage_id=storage.id)
    backups = []
    for i, status in enumerate(statuses):
        backup = await create_backup(
            session,
            instance,
            chain_id=chain.id,
            storage_id=storage.id,
            type="full" if i == 0 else "incremental",
            status=status,
            parent_id=backups[-1].id if backups else None,
        )
        prefix = backup_prefix(instance.id, chain.id, backup.id)
        (root / prefix).mkdir(parents=True)
        for name in ("vda.qcow2", "manifest.json"):
            (root / prefix / name).write_bytes(b"x")
        session.add(
            BackupFile(
                id=uuid.uuid4(),
                backup_id=backup.id,
                disk_target="vda",
                object_key=f"{prefix}/vda.qcow2",
                size_bytes=1,
                sha256="0" * 64,
            )
        )
        backups.append(backup)
    await session.flush()
    return backups


async def test_an_instance_with_backups_is_refused_without_delete_backups(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    instance = await create_instance(session, await create_user(session))
    await create_backup(session, instance)
    body = assert_problem(await client.delete(f"/instances/{instance.id}", headers=headers), 409)
    assert "1 backup(s)" in body["detail"] and "?delete_backups=true" in body["detail"]
    assert (await client.get(f"/instances/{instance.id}", headers=headers)).status_code == 200


async def test_an_instance_goes_with_its_backups_and_their_files(
    client: httpx.AsyncClient,
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
    arq_redis: ArqRedis,
    tmp_path: Path,
) -> None:
    _, headers = await admin_with_headers(session)
    owner = await create_user(session)
    storage = BackupStorage(
        id=uuid.uuid4(), name="disk", kind="local", config={"path": str(tmp_path)}
    )
    session.add(storage)
    hypervisor = await create_hypervisor(session, backup_storage_id=storage.id)
    policy = await create_policy(session, owner)
    instance = await create_instance(
        session, owner, hypervisor_id=hypervisor.id, backup_policy_id=policy.id
    )
    backups = await _stored_chain(
        session, instance, storage, tmp_path, ["completed", "completed", "failed"]
    )
    await create_restore(session, instance, backup_id=backups[1].id)

    response = await client.delete(
        f"/instances/{instance.id}", params={"delete_backups": "true"}, headers=headers
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "deleting"
    assert sorted(body["backup_ids"]) == sorted(str(b.id) for b in backups)
    for backup in backups:
        await session.refresh(backup)
        assert backup.status == "deleting"
    queued = {j.job_id for j in await arq_redis.queued_jobs(queue_name=CONTROL_QUEUE)}
    assert {f"delete:{b.id}" for b in backups} <= queued
    # Gone from the API at once: no read, no Backup now, no attaching it again.
    assert_problem(await client.get(f"/instances/{instance.id}", headers=headers), 404)
    listed = (await client.get("/instances", headers=headers)).json()
    assert str(instance.id) not in {i["id"] for i in listed["items"]}
    assert_problem(await client.post(f"/instances/{instance.id}/backups", headers=headers), 404)
    attach = await client.post(
        f"/backup-policies/{policy.id}/instances",
        json={"instance_id": str(instance.id)},
        headers=headers,
    )
    assert_problem(attach, 404)
    await session.refresh(instance)
    assert instance.backup_policy_id is None and instance.deleting_at is not None
    # Asked again while its backups go: it is already gone as far as the API is concerned.
    again = await client.delete(
        f"/instances/{instance.id}", params={"delete_backups": "true"}, headers=headers
    )
    assert_problem(again, 404)

    ctx = {RESOURCES: Resources(settings, sessionmaker, arq_redis), "job_try": 1}
    for backup in backups[:-1]:
        assert await delete_backup_files(ctx, str(backup.id)) == "deleted"  # type: ignore[arg-type]
        assert await session.get(Instance, instance.id, populate_existing=True) is not None
    assert await delete_backup_files(ctx, str(backups[-1].id)) == "deleted"  # type: ignore[arg-type]

    assert not list(tmp_path.rglob("*.*"))  # every image and manifest removed
    for model in (Instance, Backup, BackupChain, Restore):
        column = model.id if model is Instance else model.instance_id  # type: ignore[attr-defined]
        left = await session.scalar(
            select(func.count()).select_from(model).where(column == instance.id)
        )
        assert left == 0, model


async def test_an_instance_without_backups_goes_with_its_restore_history(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    instance = await create_instance(session, await create_user(session))
    await create_restore(session, instance, status="failed")
    response = await client.delete(f"/instances/{instance.id}", headers=headers)
    assert response.status_code == 204, response.text
    session.expunge_all()
    assert await session.get(Instance, instance.id) is None
    assert not await session.scalar(
        select(func.count()).select_from(Restore).where(Restore.instance_id == instance.id)
    )


async def test_an_instance_with_work_queued_is_not_deleted_under_it(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    instance = await create_instance(session, await create_user(session))
    done = await create_backup(session, instance)
    await create_backup(session, instance, status="pending", completed_at=None)
    response = await client.delete(
        f"/instances/{instance.id}", params={"delete_backups": "true"}, headers=headers
    )
    assert "delete the instance when it finishes" in assert_problem(response, 409)["detail"]
    await session.refresh(done)
    assert done.status == "completed"


async def test_users_cannot_delete_an_instance_with_its_backups(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    instance = await create_instance(session, user)
    await create_backup(session, instance)
    response = await client.delete(
        f"/instances/{instance.id}", params={"delete_backups": "true"}, headers=headers
    )
    assert_problem(response, 403)


async def test_deleting_the_instance_that_kept_its_policy_in_error_recovers_the_policy(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    """The failing VM is gone: every instance left has its newest backup completed."""
    _, headers = await admin_with_headers(session)
    owner = await create_user(session)
    policy = await create_policy(session, owner)
    healthy = await create_instance(session, owner, backup_policy_id=policy.id)
    broken = await create_instance(session, owner, backup_policy_id=policy.id)
    await create_backup(session, healthy)
    await create_backup(session, broken, status="failed", error="Instance is stopped")
    policy.status, policy.last_error = "error", f"{broken.name}: Instance is stopped"
    await session.flush()

    response = await client.delete(
        f"/instances/{broken.id}", params={"delete_backups": "true"}, headers=headers
    )
    assert response.status_code == 202, response.text
    shown = (await client.get(f"/backup-policies/{policy.id}", headers=headers)).json()
    assert shown["status"] == "active"
    assert shown["last_error"] == f"{broken.name}: Instance is stopped"  # kept as history
    assert shown["last_error_resolved_at"] is not None
