"""Delivery to a real HTTP receiver on loopback: signatures checked with the standardwebhooks
package (an implementation independent of ours), retries with backoff, automatic disabling."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from arq.connections import ArqRedis
from prometheus_client import REGISTRY
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from standardwebhooks import Webhook, WebhookVerificationError

from app.engine.webhooks.delivery import (
    ENDPOINT_DISABLED,
    DeliverySettings,
    deliver_due,
    prune_log,
)
from app.engine.webhooks.events import emit_event
from app.engine.webhooks.signing import new_secret
from app.models import WebhookDelivery, WebhookEndpoint
from app.queues import CONTROL_QUEUE
from tests.api.helpers import user_with_headers
from tests.factories import create_user, create_webhook
from tests.webhooks.receiver import Receiver
from worker.jobs import RESOURCES, Resources
from worker.tasks.webhooks import deliver_webhooks

NO_WAIT = DeliverySettings(retry_schedule=(timedelta(0), timedelta(0)), allow_private=True)


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


async def _deliveries(session: AsyncSession, endpoint: WebhookEndpoint) -> list[WebhookDelivery]:
    """The endpoint's deliveries as the database has them now."""
    rows = await session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint.id)
        .order_by(WebhookDelivery.created_at)
        .execution_options(populate_existing=True)
    )
    return list(rows)


def _attempts(result: str) -> float:
    return REGISTRY.get_sample_value("ibp_webhook_attempts_total", {"result": result}) or 0.0


async def test_test_event_is_sent_by_the_worker_signed_per_standard_webhooks(
    client: httpx.AsyncClient,
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: object,
    arq_redis: ArqRedis,
    receiver: Receiver,
) -> None:
    user, headers = await user_with_headers(session)
    created = await client.post(
        "/webhooks", json={"url": receiver.url(), "events": ["backup.failed"]}, headers=headers
    )
    secret = created.json()["secret"]
    await arq_redis.flushdb()
    test = await client.post(f"/webhooks/{created.json()['id']}/test", headers=headers)
    assert test.status_code == 202
    # Queued after the request's commit, on the control queue.
    queued = await arq_redis.queued_jobs(queue_name=CONTROL_QUEUE)
    assert [j.function for j in queued] == ["deliver_webhooks"]
    assert receiver.requests == []  # nothing is sent by the API itself

    res = Resources(settings, sessionmaker)  # type: ignore[arg-type]
    outcome = await deliver_webhooks({RESOURCES: res})
    assert outcome.startswith("attempted=1 succeeded=1")

    [request] = receiver.requests
    payload = Webhook(secret).verify(request.body, request.headers)
    assert payload["type"] == "webhook.test"
    assert payload["data"]["endpoint_id"] == created.json()["id"]
    assert payload["data"]["owner_id"] == str(user.id)
    assert datetime.fromisoformat(payload["timestamp"])
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-id"] == test.json()["message_id"]
    with pytest.raises(WebhookVerificationError):  # another secret does not verify it
        Webhook(new_secret()).verify(request.body, request.headers)

    log = (await client.get(f"/webhooks/{created.json()['id']}/deliveries", headers=headers)).json()
    [delivery] = log["items"]
    assert delivery["status"] == "succeeded"
    assert delivery["attempts"] == 1
    assert delivery["last_response_code"] == 200
    assert delivery["last_error"] is None


async def test_server_errors_are_retried_on_the_backoff_schedule_until_one_succeeds(
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
    receiver: Receiver,
) -> None:
    secret = new_secret()
    owner = await create_user(session)
    endpoint = await create_webhook(session, owner, secret, url=receiver.url())
    await emit_event(session, "backup.completed", owner.id, {"backup_id": "b1"})
    await session.commit()
    receiver.answer("/hook", 500, 503)
    clock = Clock()
    short = DeliverySettings(
        retry_schedule=(timedelta(seconds=5), timedelta(minutes=1)), allow_private=True, now=clock
    )

    counted = {r: _attempts(r) for r in ("succeeded", "retrying", "gave_up")}
    run = await deliver_due(sessionmaker, short)
    assert (run.attempted, run.succeeded) == (1, 0)
    [delivery] = await _deliveries(session, endpoint)
    assert (delivery.status, delivery.attempts, delivery.last_response_code) == ("pending", 1, 500)
    assert delivery.last_error == "HTTP 500"
    assert delivery.next_attempt_at == clock.now + timedelta(seconds=5)

    clock.now += timedelta(seconds=4)
    assert (await deliver_due(sessionmaker, short)).attempted == 0  # not due yet
    clock.now += timedelta(seconds=1)
    assert (await deliver_due(sessionmaker, short)).attempted == 1
    [delivery] = await _deliveries(session, endpoint)
    assert (delivery.attempts, delivery.last_response_code) == (2, 503)
    assert delivery.next_attempt_at == clock.now + timedelta(minutes=1)

    clock.now += timedelta(minutes=1)
    assert (await deliver_due(sessionmaker, short)).succeeded == 1
    [delivery] = await _deliveries(session, endpoint)
    assert (delivery.status, delivery.attempts, delivery.last_response_code) == (
        "succeeded",
        3,
        200,
    )
    assert delivery.next_attempt_at is None
    # Two attempts retried, one succeeded: the workers' metrics say so.
    moved = {r: _attempts(r) - before for r, before in counted.items()}
    assert moved == {"succeeded": 1, "retrying": 2, "gave_up": 0}
    # Every attempt carried the same message id, each signed with its own timestamp.
    assert len(receiver.requests) == 3
    assert {r.headers["webhook-id"] for r in receiver.requests} == {delivery.message_id}
    timestamps = [int(r.headers["webhook-timestamp"]) for r in receiver.requests]
    assert timestamps == sorted(timestamps) and timestamps[0] < timestamps[-1]
    for request in receiver.requests:  # the test's clock ran ahead by a minute: within 5
        assert Webhook(secret).verify(request.body, request.headers)["data"] == {
            "owner_id": str(owner.id),
            "backup_id": "b1",
        }
        assert json.loads(request.body)["type"] == "backup.completed"


async def test_an_endpoint_failing_every_attempt_is_disabled_with_the_reason(
    client: httpx.AsyncClient,
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
    receiver: Receiver,
) -> None:
    owner, headers = await user_with_headers(session)
    endpoint = await create_webhook(session, owner, url=receiver.url("/down"))
    await emit_event(session, "backup.failed", owner.id, {"backup_id": "b1"})
    await session.commit()
    receiver.answer("/down", 500, 500, 500)
    gave_up = _attempts("gave_up")
    disabled = REGISTRY.get_sample_value("ibp_webhook_endpoints_disabled_total") or 0.0

    run = await deliver_due(sessionmaker, NO_WAIT)
    assert (run.attempted, run.failed, run.disabled) == (3, 1, [endpoint.id])
    assert _attempts("gave_up") == gave_up + 1
    assert REGISTRY.get_sample_value("ibp_webhook_endpoints_disabled_total") == disabled + 1
    assert len(receiver.at("/down")) == 3
    [delivery] = await _deliveries(session, endpoint)
    assert (delivery.status, delivery.attempts, delivery.last_response_code) == ("failed", 3, 500)

    read = (await client.get(f"/webhooks/{endpoint.id}", headers=headers)).json()
    assert read["enabled"] is False
    assert read["disabled_at"] is not None
    assert "gave up after 3 attempts" in read["disabled_reason"]
    assert "HTTP 500" in read["disabled_reason"]

    # Nothing more goes to it: a new event finds no enabled endpoint.
    assert await emit_event(session, "backup.failed", owner.id, {"backup_id": "b2"}) == 0

    # Enabled again, it receives events again.
    await client.patch(f"/webhooks/{endpoint.id}", json={"enabled": True}, headers=headers)
    assert await emit_event(session, "backup.failed", owner.id, {"backup_id": "b3"}) == 1
    await session.commit()
    assert (await deliver_due(sessionmaker, NO_WAIT)).succeeded == 1


async def test_an_endpoint_that_succeeded_meanwhile_is_not_disabled(
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
    receiver: Receiver,
) -> None:
    owner = await create_user(session)
    endpoint = await create_webhook(session, owner, url=receiver.url("/flaky"))
    clock = Clock()
    settings = DeliverySettings(
        retry_schedule=(timedelta(seconds=10),), allow_private=True, now=clock
    )
    await emit_event(session, "backup.failed", owner.id, {"n": 1}, at=clock.now)
    await session.commit()
    receiver.answer("/flaky", 500)
    await deliver_due(sessionmaker, settings)  # the first fails, retried in 10 s
    clock.now += timedelta(seconds=1)
    await emit_event(session, "backup.failed", owner.id, {"n": 2}, at=clock.now)
    await session.commit()
    assert (await deliver_due(sessionmaker, settings)).succeeded == 1  # the second succeeds
    receiver.answer("/flaky", 500)
    clock.now += timedelta(seconds=10)
    run = await deliver_due(sessionmaker, settings)
    assert (run.failed, run.disabled) == (1, [])
    await session.refresh(endpoint)
    assert endpoint.enabled is True


async def test_disabled_endpoints_pending_deliveries_fail_with_the_reason(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    owner, headers = await user_with_headers(session)
    endpoint = await create_webhook(session, owner)
    await emit_event(session, "backup.failed", owner.id, {"backup_id": "b1"})
    await client.patch(f"/webhooks/{endpoint.id}", json={"enabled": False}, headers=headers)
    [delivery] = await _deliveries(session, endpoint)
    assert (delivery.status, delivery.last_error) == ("failed", ENDPOINT_DISABLED)


async def test_finished_deliveries_leave_the_log_after_30_days(session: AsyncSession) -> None:
    owner = await create_user(session)
    endpoint = await create_webhook(session, owner)
    now = datetime.now(UTC)
    for status, age in (("succeeded", 31), ("failed", 31), ("succeeded", 29), ("pending", 40)):
        session.add(
            WebhookDelivery(
                endpoint_id=endpoint.id,
                event_type="backup.failed",
                message_id=f"msg_{status}_{age}",
                payload={},
                status=status,
                attempts=1,
                created_at=now - timedelta(days=age),
                completed_at=None if status == "pending" else now - timedelta(days=age),
                next_attempt_at=now if status == "pending" else None,
            )
        )
    await session.flush()
    assert await prune_log(session, now) == 2
    left = {d.message_id for d in await _deliveries(session, endpoint)}
    assert left == {"msg_succeeded_29", "msg_pending_40"}


async def test_an_attempt_without_an_answer_in_time_fails_and_is_retried(
    session: AsyncSession,
    sessionmaker: async_sessionmaker[AsyncSession],
    receiver: Receiver,
) -> None:
    owner = await create_user(session)
    endpoint = await create_webhook(session, owner, url=receiver.url("/slow"))
    await emit_event(session, "backup.failed", owner.id, {})
    await session.commit()
    receiver.delay_s = 1.0
    slow = DeliverySettings(retry_schedule=(timedelta(hours=1),), timeout_s=0.2, allow_private=True)
    assert (await deliver_due(sessionmaker, slow)).attempted == 1
    [delivery] = await _deliveries(session, endpoint)
    assert (delivery.status, delivery.attempts) == ("pending", 1)
    assert delivery.last_error == "No answer within 0.2 s"
    assert delivery.last_response_code is None
