"""The restore, Backup now and verify endpoints: rules, scoping, shapes and the jobs they queue."""

from __future__ import annotations

import socket
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from arq.connections import ArqRedis
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from app.engine.chains import chain_states
from app.engine.lifecycle import reap_stale_restores
from app.engine.verification import due_for_verification
from app.models import Backup, Instance, User
from app.queues import hypervisor_queue
from tests.api.helpers import admin_with_headers, assert_page, assert_problem, user_with_headers
from tests.factories import (
    create_backup,
    create_chain,
    create_instance,
    create_policy,
    create_restore,
)


async def _queued(redis: ArqRedis, instance: Instance, job_id: str) -> bool:
    return await redis.zscore(hypervisor_queue(instance.hypervisor_id), job_id) is not None


async def _owned(
    session: AsyncSession, status: str = "deployed", **policy: Any
) -> tuple[User, dict[str, str], Instance]:
    user, headers = await user_with_headers(session)
    p = await create_policy(session, user, **policy)
    instance = await create_instance(session, user, status=status, backup_policy_id=p.id)
    return user, headers, instance


async def _restore(
    client: httpx.AsyncClient, backup: Backup, headers: dict[str, str], target: str
) -> httpx.Response:
    return await client.post(
        f"/backups/{backup.id}/restore", json={"target": target}, headers=headers
    )


async def test_new_disk_restore_is_accepted_listed_and_read(
    client: httpx.AsyncClient, session: AsyncSession, arq_redis: ArqRedis
) -> None:
    _, headers, instance = await _owned(session)
    backup = await create_backup(session, instance)
    r = await _restore(client, backup, headers, "new_disk")
    assert r.status_code == 202, r.text
    body = r.json()
    assert set(body) == {
        "id",
        "backup_id",
        "instance_id",
        "target",
        "status",
        "progress",
        "error",
        "error_detail",
        "result",
        "created_at",
        "started_at",
        "completed_at",
    }
    assert body["status"] == "pending" and body["target"] == "new_disk"
    assert body["backup_id"] == str(backup.id) and body["instance_id"] == str(instance.id)
    assert await _queued(arq_redis, instance, f"restore:{body['id']}")

    read = await client.get(f"/restores/{body['id']}", headers=headers)
    assert read.status_code == 200 and read.json() == body
    page = (await client.get(f"/instances/{instance.id}/restores", headers=headers)).json()
    assert_page(page, total=1)
    assert page["items"] == [body]

    # One restore at a time, and no backup beside it.
    again = await _restore(client, backup, headers, "new_disk")
    assert "A restore of this instance is pending" in assert_problem(again, 409)["detail"]
    now = await client.post(f"/instances/{instance.id}/backups", headers=headers)
    assert "A restore of this instance is pending" in assert_problem(now, 409)["detail"]
    chain = (await chain_states(session, [instance.id]))[instance.id]
    assert chain.busy


async def test_in_place_needs_a_stopped_instance(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers, instance = await _owned(session)
    backup = await create_backup(session, instance)
    r = await _restore(client, backup, headers, "in_place")
    body = assert_problem(r, 409)
    assert body["detail"] == "Instance must be stopped for an in-place restore (status: deployed)"
    instance.status = "stopped"
    await session.flush()
    r = await _restore(client, backup, headers, "in_place")
    assert r.status_code == 202, r.text


async def test_only_completed_backups_restore_and_never_beside_a_running_backup(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers, instance = await _owned(session)
    done = await create_backup(session, instance)
    running = await create_backup(
        session, instance, status="in_progress", scheduled_for=datetime.now(UTC) + timedelta(1)
    )
    r = await _restore(client, running, headers, "new_disk")
    assert "Only completed backups" in assert_problem(r, 409)["detail"]
    r = await _restore(client, done, headers, "new_disk")
    assert "A backup of this instance is in progress" in assert_problem(r, 409)["detail"]
    r = await _restore(client, done, headers, "x")
    assert_problem(r, 422, field="target")


async def test_other_users_backups_and_restores_are_404(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    _, other_headers, instance = await _owned(session)
    backup = await create_backup(session, instance)
    mine = await _restore(client, backup, other_headers, "new_disk")
    assert mine.status_code == 202
    for method, url, body in [
        ("POST", f"/backups/{backup.id}/restore", {"target": "new_disk"}),
        ("POST", f"/backups/{backup.id}/verify", None),
        ("POST", f"/instances/{instance.id}/backups", None),
        ("GET", f"/restores/{mine.json()['id']}", None),
        ("GET", f"/instances/{instance.id}/restores", None),
    ]:
        r = await client.request(method, url, json=body, headers=headers)
        assert_problem(r, 404)
    _, admin = await admin_with_headers(session)
    assert (await client.get(f"/restores/{mine.json()['id']}", headers=admin)).status_code == 200


async def test_backup_now_follows_the_chain(
    client: httpx.AsyncClient, session: AsyncSession, arq_redis: ArqRedis
) -> None:
    _, headers, instance = await _owned(session, max_incremental_chain=2, backup_device="all")
    first = await client.post(f"/instances/{instance.id}/backups", headers=headers)
    assert first.status_code == 202, first.text
    body = first.json()
    assert body["type"] == "full" and body["status"] == "pending" and body["manual"] is True
    assert body["policy_id"] == str(instance.backup_policy_id)
    assert body["backup_device"] == "all"
    assert body["plan_reason"] == "first backup of the instance"
    assert await _queued(arq_redis, instance, f"backup:{body['id']}")
    busy = await client.post(f"/instances/{instance.id}/backups", headers=headers)
    assert "A backup of this instance is pending" in assert_problem(busy, 409)["detail"]

    # With a completed full in the chain: an incremental, unless a full is asked for.
    pending = await session.get(Backup, uuid.UUID(body["id"]))
    assert pending is not None
    chain = await create_chain(session, instance, backup_device="all")
    pending.status, pending.chain_id, pending.checkpoint_name = "completed", chain.id, "cp"
    await session.flush()
    inc = await client.post(f"/instances/{instance.id}/backups", headers=headers, json={})
    assert inc.status_code == 202 and inc.json()["type"] == "incremental", inc.text
    assert inc.json()["plan_reason"] == "incremental 1 of 2"
    done = await session.get(Backup, uuid.UUID(inc.json()["id"]))
    assert done is not None
    done.status = "completed"
    await session.flush()
    full = await client.post(
        f"/instances/{instance.id}/backups", headers=headers, json={"type": "full"}
    )
    assert full.status_code == 202 and full.json()["type"] == "full", full.text
    assert full.json()["plan_reason"] == "full backup requested"
    bad = await client.post(
        f"/instances/{instance.id}/backups", headers=headers, json={"type": "incremental"}
    )
    assert_problem(bad, 422, field="type")


async def test_backup_now_needs_a_deployed_instance(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers, instance = await _owned(session, status="suspended")
    r = await client.post(f"/instances/{instance.id}/backups", headers=headers)
    assert assert_problem(r, 409)["detail"] == "Instance is suspended"


async def test_backup_now_without_a_policy_is_a_primary_full(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    instance = await create_instance(session, user)
    r = await client.post(f"/instances/{instance.id}/backups", headers=headers)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["policy_id"] is None and body["type"] == "full"
    assert body["backup_device"] == "primary"


async def test_verify_queues_a_job_for_completed_backups_only(
    client: httpx.AsyncClient, session: AsyncSession, arq_redis: ArqRedis
) -> None:
    _, headers, instance = await _owned(session)
    backup = await create_backup(session, instance)
    r = await client.post(f"/backups/{backup.id}/verify", headers=headers)
    assert r.status_code == 202, r.text
    assert r.json()["id"] == str(backup.id)
    assert await _queued(arq_redis, instance, f"verify:{backup.id}")
    failed = await create_backup(
        session, instance, status="failed", scheduled_for=datetime.now(UTC) + timedelta(1)
    )
    r = await client.post(f"/backups/{failed.id}/verify", headers=headers)
    assert "Only completed backups can be verified" in assert_problem(r, 409)["detail"]


async def test_periodic_verification_picks_each_instances_newest_unverified_chain(
    session: AsyncSession,
) -> None:
    user, _ = await user_with_headers(session)
    now = datetime.now(UTC)
    a = await create_instance(session, user)
    b = await create_instance(session, user)
    chain_a = await create_chain(session, a)
    chain_b = await create_chain(session, b)
    await create_backup(session, a, chain_id=chain_a.id, created_at=now - timedelta(hours=2))
    newest_a = await create_backup(
        session, a, chain_id=chain_a.id, type="incremental", created_at=now - timedelta(hours=1)
    )
    checked_b = await create_backup(
        session, b, chain_id=chain_b.id, verified_at=now - timedelta(hours=1), verify_ok=True
    )
    due = dict(await due_for_verification(session, now, timedelta(hours=24)))
    assert due.get(newest_a.id) == a.hypervisor_id
    assert checked_b.id not in due  # b's chain was checked an hour ago
    due_soon = dict(await due_for_verification(session, now, timedelta(minutes=30)))
    assert due_soon.get(checked_b.id) == b.hypervisor_id


async def test_stale_restores_are_reaped(session: AsyncSession) -> None:
    user, _ = await user_with_headers(session)
    instance = await create_instance(session, user)
    now = datetime.now(UTC)
    started = {"status": "in_progress", "created_at": now - timedelta(hours=1)}
    lost = await create_restore(session, instance, heartbeat_at=now - timedelta(hours=1), **started)
    alive = await create_restore(session, instance, heartbeat_at=now, **started)
    reaped = await reap_stale_restores(session, now, timedelta(minutes=15), timedelta(hours=6))
    assert lost.id in reaped and alive.id not in reaped
    await session.refresh(lost)
    assert lost.status == "failed" and (lost.error or "").startswith("Worker lost")


async def test_backups_cannot_be_deleted_while_a_restore_reads_them(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers, instance = await _owned(session)
    backup = await create_backup(session, instance)
    r = await _restore(client, backup, headers, "new_disk")
    assert r.status_code == 202, r.text
    response = await client.delete(f"/backups/{backup.id}", headers=headers)
    assert_problem(response, 409)
    assert "restore" in response.json()["detail"]
    await session.refresh(backup)
    assert backup.status == "completed"


async def test_with_redis_down_backup_now_is_still_accepted_and_verify_is_a_503(
    app: FastAPI, client: httpx.AsyncClient, session: AsyncSession
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.state.arq = ArqRedis(host="127.0.0.1", port=port, socket_connect_timeout=2)
    try:
        _, headers, instance = await _owned(session)
        # The pending row is saved; the scheduler tick sends its job once Redis is back.
        now = await client.post(f"/instances/{instance.id}/backups", headers=headers)
        assert now.status_code == 202, now.text
        saved = await session.get(Backup, uuid.UUID(now.json()["id"]))
        assert saved is not None and saved.status == "pending"
        # A verify request leaves no row behind: the client is told to try again.
        completed = await create_backup(
            session, instance, scheduled_for=datetime.now(UTC) - timedelta(days=1)
        )
        refused = await client.post(f"/backups/{completed.id}/verify", headers=headers)
        assert "job queue" in assert_problem(refused, 503)["detail"]
        assert refused.headers["retry-after"] == "5"
    finally:
        await app.state.arq.aclose()


async def test_a_failed_restore_reads_in_two_views(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    """The owner reads what happened; only an admin reads where (hosts, hypervisor names)."""
    _, headers, instance = await _owned(session)
    _, admin = await admin_with_headers(session)
    failed = await create_restore(
        session,
        instance,
        status="failed",
        error="Backup storage is unreachable",
        error_detail="Backup storage is unreachable: cannot reach S3 endpoint http://10.0.0.5:9000",
    )
    urls = (f"/restores/{failed.id}", f"/instances/{instance.id}/restores")
    mine = [(await client.get(url, headers=headers)).json() for url in urls]
    theirs = [(await client.get(url, headers=admin)).json() for url in urls]
    for read in (mine[0], mine[1]["items"][0]):
        assert (read["error"], read["error_detail"]) == ("Backup storage is unreachable", None)
    for read in (theirs[0], theirs[1]["items"][0]):
        assert read["error_detail"] == failed.error_detail
