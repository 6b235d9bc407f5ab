"""Events: one delivery row per endpoint that wants it, written in the transaction of the
change it reports, so nothing is sent for a change that did not commit. The control worker
sends them (`delivery`); whoever commits the session queues that job
(`queue_delivery_if_emitted`).

Payloads carry ids, names and statuses the owner sees in the API, and the owner's words of an
error; never hosts, URIs, paths, usernames or buckets.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, and_, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import (
    Backup,
    BackupPolicy,
    Instance,
    Restore,
    User,
    WebhookDelivery,
    WebhookEndpoint,
)
from app.queues import JobQueue, enqueue_webhook_delivery
from app.security import WrongSecretKey, secret_box
from app.values import WEBHOOK_TEST, DeliveryStatus, Role

# Set in session.info by an emission; read once the session committed
# (`queue_delivery_if_emitted`).
_EMITTED = "ibp.webhooks_emitted"


def seal_secret(secret: str) -> str:
    return secret_box().encrypt({"secret": secret})


def open_secret(endpoint: WebhookEndpoint) -> str:
    secret: str = secret_box().decrypt(endpoint.secret_encrypted)["secret"]
    return secret


def reseal_secrets(endpoints: Iterable[WebhookEndpoint]) -> int:
    """Seal every endpoint's signing secret again with the current IBP_SECRET_KEY (`ibp
    rotate-secrets`); how many. All or nothing: raises WrongSecretKey naming every endpoint
    whose secret opens with no key, and changes none."""
    box, resealed, failed = secret_box(), {}, []
    for endpoint in endpoints:  # each opened once; nothing is changed before all have opened
        try:
            resealed[endpoint] = box.reseal(endpoint.secret_encrypted)
        except WrongSecretKey:
            failed.append(str(endpoint.id))
    if failed:
        raise WrongSecretKey(
            f"The signing secrets of webhook endpoint(s) {', '.join(failed)} cannot be "
            "decrypted with IBP_SECRET_KEY nor any of IBP_PREVIOUS_SECRET_KEYS: add the key "
            "they were sealed with to IBP_PREVIOUS_SECRET_KEYS, or delete those endpoints"
        )
    for endpoint, sealed in resealed.items():
        endpoint.secret_encrypted = sealed
    return len(resealed)


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def payload(event_type: str, data: dict[str, Any], at: datetime | None = None) -> dict[str, Any]:
    """The body of a Standard Webhooks message."""
    return {
        "type": event_type,
        "timestamp": _iso(at or datetime.now(UTC)),
        "data": data,
    }


def subscribers(owner_id: uuid.UUID, event_type: str) -> Select[uuid.UUID]:
    """The enabled endpoints that receive `event_type` of `owner_id`'s objects: the owner's
    own, and the all-users endpoints of active admins. Never another user's."""
    return (
        select(WebhookEndpoint.id)
        .join(User, User.id == WebhookEndpoint.owner_id)
        .where(
            WebhookEndpoint.enabled,
            WebhookEndpoint.events.any_() == event_type,
            User.disabled_at.is_(None),
            or_(
                WebhookEndpoint.owner_id == owner_id,
                and_(WebhookEndpoint.all_users, User.role == Role.ADMIN),
            ),
        )
    )


async def emit_event(
    session: AsyncSession,
    event_type: str,
    owner_id: uuid.UUID,
    data: dict[str, Any],
    at: datetime | None = None,
) -> int:
    """Write a delivery of the event to every endpoint that receives it; how many."""
    endpoint_ids = list(await session.scalars(subscribers(owner_id, event_type)))
    return await _deliver(
        session, endpoint_ids, event_type, {"owner_id": str(owner_id), **data}, at
    )


async def emit_test_event(session: AsyncSession, endpoint: WebhookEndpoint) -> uuid.UUID:
    """A `webhook.test` message to this endpoint alone; the delivery's id."""
    data = {
        "owner_id": str(endpoint.owner_id),
        "endpoint_id": str(endpoint.id),
        "message": "A test event sent on request",
    }
    delivery_id = uuid.uuid4()
    await _deliver(session, [endpoint.id], WEBHOOK_TEST, data, None, delivery_id)
    return delivery_id


async def _deliver(
    session: AsyncSession,
    endpoint_ids: list[uuid.UUID],
    event_type: str,
    data: dict[str, Any],
    at: datetime | None,
    first_id: uuid.UUID | None = None,
) -> int:
    if not endpoint_ids:
        return 0
    now = at or datetime.now(UTC)
    body = payload(event_type, data, now)
    message_id = new_message_id()
    rows = [
        {
            "id": first_id if i == 0 and first_id else uuid.uuid4(),
            "endpoint_id": endpoint_id,
            "event_type": event_type,
            "message_id": message_id,
            "payload": body,
            "status": DeliveryStatus.PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        for i, endpoint_id in enumerate(endpoint_ids)
    ]
    await session.execute(insert(WebhookDelivery), rows)
    session.info[_EMITTED] = True
    return len(rows)


def queue_delivery_if_emitted(session: AsyncSession, jobs: JobQueue) -> None:
    """Call once the session committed: when it wrote deliveries, the job that sends them
    goes with `jobs`."""
    if session.info.pop(_EMITTED, False):
        enqueue_webhook_delivery(jobs)


# --- what each event says -----------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def backup_data(backup: Backup) -> dict[str, Any]:
    return {
        "backup_id": str(backup.id),
        "instance_id": str(backup.instance_id),
        "policy_id": str(backup.policy_id) if backup.policy_id else None,
        "type": backup.type,
        "status": backup.status,
        "manual": backup.manual,
        "scheduled_for": _iso(backup.scheduled_for),
        "completed_at": _iso(backup.completed_at),
        "size_bytes": backup.size_bytes,
        "error": backup.error,  # the owner's words; the operator's stay in error_detail
    }


def restore_data(restore: Restore) -> dict[str, Any]:
    # Not `result`: it holds paths on the hypervisor.
    return {
        "restore_id": str(restore.id),
        "backup_id": str(restore.backup_id) if restore.backup_id else None,
        "instance_id": str(restore.instance_id),
        "target": restore.target,
        "status": restore.status,
        "completed_at": _iso(restore.completed_at),
        "error": restore.error,
    }


def policy_data(policy: BackupPolicy) -> dict[str, Any]:
    return {
        "policy_id": str(policy.id),
        "name": policy.name,
        "status": policy.status,
        "last_error": policy.last_error,
        "last_error_at": _iso(policy.last_error_at),
    }


async def emit_backup(session: AsyncSession, event_type: str, backup: Backup) -> int:
    """backup.completed or backup.failed, to the instance owner's endpoints."""
    owner_id = await _instance_owner(session, backup.instance_id)
    return await emit_event(session, event_type, owner_id, backup_data(backup))


async def emit_restore(session: AsyncSession, event_type: str, restore: Restore) -> int:
    """restore.completed or restore.failed, to the instance owner's endpoints."""
    owner_id = await _instance_owner(session, restore.instance_id)
    return await emit_event(session, event_type, owner_id, restore_data(restore))


async def emit_policy(session: AsyncSession, event_type: str, policy: BackupPolicy) -> int:
    """policy.error or policy.recovered, to the policy owner's endpoints."""
    return await emit_event(session, event_type, policy.owner_id, policy_data(policy))


async def emit_protection(
    session: AsyncSession,
    event_type: str,
    instance_id: uuid.UUID,
    policy_id: uuid.UUID | None,
    before: str | None,
    after: str | None,
    last_good_backup_at: datetime | None,
) -> int:
    """protection.at_risk or protection.restored, to the instance owner's endpoints."""
    owner_id = await _instance_owner(session, instance_id)
    data = {
        "instance_id": str(instance_id),
        "policy_id": str(policy_id) if policy_id else None,
        "protection": after,
        "previous_protection": before,
        "last_good_backup_at": _iso(last_good_backup_at),
    }
    return await emit_event(session, event_type, owner_id, data)


async def _instance_owner(session: AsyncSession, instance_id: uuid.UUID) -> uuid.UUID:
    owner: uuid.UUID | None = await session.scalar(
        select(Instance.owner_id).where(Instance.id == instance_id)
    )
    assert owner is not None
    return owner
