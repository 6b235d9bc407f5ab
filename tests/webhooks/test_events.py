"""Events from where backups, restores and policies change, delivered to the owner's endpoints
and admins' all-users endpoints only, with the owner's words and no infrastructure."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from standardwebhooks import Webhook

from app.config import Settings
from app.engine.lifecycle import reap_stale_restores, record_failure
from app.engine.webhooks.delivery import DeliverySettings, deliver_due
from app.engine.webhooks.events import emit_event
from app.engine.webhooks.signing import new_secret
from app.engine.words import Words
from app.models import Backup, Hypervisor, Instance, WebhookDelivery
from tests.factories import (
    create_admin,
    create_backup,
    create_instance,
    create_policy,
    create_restore,
    create_user,
    create_webhook,
)
from tests.webhooks.receiver import Receiver
from tests.worker.standin import complete_pending
from worker.jobs import Resources
from worker.tasks.restore import RestoreJob, _complete
from worker.tasks.tick import run_tick

SEND = DeliverySettings(retry_schedule=(), allow_private=True)
GRACE = timedelta(hours=6)


def _types(receiver: Receiver, path: str, secret: str) -> list[str]:
    """The event types that reached `path`, each signature checked with `secret`."""
    return [Webhook(secret).verify(r.body, r.headers)["type"] for r in receiver.at(path)]


async def test_users_receive_only_their_own_events_and_admins_all_users_endpoints_all(
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
    receiver: Receiver,
) -> None:
    alice, bob = await create_user(session), await create_user(session)
    admin, other_admin = await create_admin(session), await create_admin(session)
    secrets = {name: new_secret() for name in ("alice", "bob", "all", "own")}
    for owner, name, all_users in (
        (alice, "alice", False),
        (bob, "bob", False),
        (admin, "all", True),
        (other_admin, "own", False),
    ):
        await create_webhook(
            session, owner, secrets[name], url=receiver.url(f"/{name}"), all_users=all_users
        )
    good = await create_instance(session, alice, name="web-1")
    bad = await create_instance(session, alice, name="db-1", status="suspended")
    policy = await create_policy(session, alice, next_run_at=datetime(2026, 6, 1, 2, tzinfo=UTC))
    good.backup_policy_id = bad.backup_policy_id = policy.id
    await session.commit()

    # Day 1: db-1 is suspended (the tick fails its backup, the policy goes to Error), web-1's
    # backup completes. Day 2: both complete, the policy is Active again.
    await run_tick(sessionmaker, None, datetime(2026, 6, 1, 2, tzinfo=UTC), GRACE)
    await complete_pending(sessionmaker, datetime(2026, 6, 1, 2, 10, tzinfo=UTC))
    bad.status = "deployed"
    await session.commit()
    await run_tick(sessionmaker, None, datetime(2026, 6, 2, 2, tzinfo=UTC), GRACE)
    await complete_pending(sessionmaker, datetime(2026, 6, 2, 2, 10, tzinfo=UTC))

    run = await deliver_due(sessionmaker, SEND)
    assert run.attempted == run.succeeded == 12  # 6 events, to alice and to the admin
    expected = [
        "backup.failed",
        "policy.error",
        "backup.completed",
        "backup.completed",
        "backup.completed",
        "policy.recovered",
    ]
    assert sorted(_types(receiver, "/alice", secrets["alice"])) == sorted(expected)
    assert sorted(_types(receiver, "/all", secrets["all"])) == sorted(expected)
    assert receiver.at("/bob") == []
    assert receiver.at("/own") == []

    failed = next(json.loads(r.body) for r in receiver.at("/alice") if b'"backup.failed"' in r.body)
    backup = await session.scalar(select(Backup).where(Backup.instance_id == bad.id))
    assert backup is not None
    assert failed["data"] == {
        "owner_id": str(alice.id),
        "backup_id": str(backup.id),
        "instance_id": str(bad.id),
        "policy_id": str(policy.id),
        "type": "full",
        "status": "failed",
        "manual": False,
        "scheduled_for": "2026-06-01T02:00:00Z",
        "completed_at": "2026-06-01T02:00:00Z",
        "size_bytes": None,
        "error": "Instance is suspended",
    }
    hypervisor = await session.get(Hypervisor, bad.hypervisor_id)
    assert hypervisor is not None
    for request in receiver.requests:  # no hypervisor, URI or domain in any payload
        for secret_word in (hypervisor.name, hypervisor.libvirt_uri, bad.domain_name):
            assert secret_word.encode() not in request.body


async def test_policy_error_is_sent_once_while_the_policy_stays_in_error(
    session: AsyncSession,
) -> None:
    owner = await create_user(session)
    await create_webhook(session, owner)
    policy = await create_policy(session, owner)
    instance = await create_instance(session, owner, backup_policy_id=policy.id)
    now = datetime.now(UTC)
    for _ in range(2):
        backup = await create_backup(session, instance, status="failed", error="Disk busy")
        await record_failure(session, backup, "Disk busy", now)
    types = list(await session.scalars(select(WebhookDelivery.event_type)))
    assert sorted(types) == ["backup.failed", "backup.failed", "policy.error"]


async def test_restore_completion_and_failures_are_sent_without_paths(
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
) -> None:
    owner = await create_user(session)
    await create_webhook(session, owner)
    instance = await create_instance(session, owner)
    backup = await create_backup(session, instance)
    done = await create_restore(session, instance, backup_id=backup.id, status="in_progress")
    refused = await create_restore(session, instance, backup_id=backup.id, status="pending")
    old = datetime.now(UTC) - timedelta(hours=2)
    lost = await create_restore(
        session, instance, status="in_progress", heartbeat_at=old, created_at=old
    )
    await session.commit()

    work: Any = SimpleNamespace(restore=done)
    await _complete(Resources(settings, sessionmaker), work, {"vda": "/var/lib/secret/vda.qcow2"})
    async with sessionmaker() as s:
        await RestoreJob().fail(s, refused.id, Words("A backup of this instance is running"))
        await reap_stale_restores(s, datetime.now(UTC), timedelta(minutes=15), timedelta(hours=1))
        await s.commit()

    rows = list(await session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)))
    sent = {(r.payload["data"]["restore_id"], r.event_type) for r in rows}
    assert sent == {
        (str(done.id), "restore.completed"),
        (str(refused.id), "restore.failed"),
        (str(lost.id), "restore.failed"),
    }
    for row in rows:
        assert "/var/lib" not in json.dumps(row.payload)
        assert row.payload["data"]["instance_id"] == str(instance.id)


async def test_disabled_users_and_demoted_admins_receive_nothing_more(
    session: AsyncSession,
) -> None:
    owner = await create_user(session)
    admin = await create_admin(session)
    await create_webhook(session, admin, all_users=True)
    assert await emit_event(session, "backup.failed", owner.id, {}) == 1
    admin.role = "user"
    await session.flush()
    assert await emit_event(session, "backup.failed", owner.id, {}) == 0
    await create_webhook(session, owner, events=["backup.failed"])
    assert await emit_event(session, "backup.failed", owner.id, {}) == 1
    assert await emit_event(session, "backup.completed", owner.id, {}) == 0  # not subscribed
    owner.disabled_at = datetime.now(UTC)
    await session.flush()
    assert await emit_event(session, "backup.failed", owner.id, {}) == 0


async def test_nothing_is_sent_for_a_change_that_rolled_back(
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
    receiver: Receiver,
) -> None:
    owner = await create_user(session)
    await create_webhook(session, owner, url=receiver.url())
    instance = await create_instance(session, owner)
    await session.commit()
    async with sessionmaker() as s:
        backup = await create_backup(s, await s.get_one(Instance, instance.id), status="failed")
        await record_failure(s, backup, "boom", datetime.now(UTC))
        await s.rollback()
    assert (await deliver_due(sessionmaker, SEND)).attempted == 0
    assert receiver.requests == []


async def test_protection_events_when_an_instance_falls_behind_and_when_it_is_protected_again(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    """protection.at_risk once when the last good backup is older than the policy expects;
    protection.restored once a backup completes; the first measurement sends nothing."""
    from app.engine.protection import evaluate_protection

    owner = await create_user(session)
    endpoint = await create_webhook(session, owner)
    policy = await create_policy(session, owner)  # daily: expected within 1 day + the grace
    instance = await create_instance(session, owner, backup_policy_id=policy.id)
    t0 = datetime(2026, 6, 1, 2, 5, tzinfo=UTC)
    await create_backup(session, instance, status="completed", completed_at=t0, created_at=t0)
    await session.flush()

    async def sent() -> list[tuple[str, dict[str, Any]]]:
        rows = await session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == endpoint.id)
            .order_by(WebhookDelivery.created_at)
        )
        return [(d.event_type, d.payload["data"]) for d in rows]

    await evaluate_protection(session, t0 + timedelta(hours=1), GRACE)  # first: protected
    assert await sent() == []
    await evaluate_protection(session, t0 + timedelta(hours=31), GRACE)
    await evaluate_protection(session, t0 + timedelta(hours=32), GRACE)  # still: nothing more
    back = t0 + timedelta(hours=33)
    await create_backup(session, instance, status="completed", completed_at=back, created_at=back)
    await evaluate_protection(session, back, GRACE)

    events = await sent()
    assert [event for event, _ in events] == ["protection.at_risk", "protection.restored"]
    at_risk, restored = (data for _, data in events)
    assert at_risk == {
        "instance_id": str(instance.id),
        "policy_id": str(policy.id),
        "protection": "at_risk",
        "previous_protection": "protected",
        "last_good_backup_at": "2026-06-01T02:05:00Z",
        "owner_id": str(owner.id),
    }
    assert restored["protection"] == "protected"
    assert restored["last_good_backup_at"] == "2026-06-02T11:05:00Z"
