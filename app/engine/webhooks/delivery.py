"""Sending deliveries: signed, one attempt each time one is due, retried with exponential
backoff for about a day; an endpoint whose deliveries keep failing is disabled with the reason.

Run by the control worker (worker/tasks/webhooks.py) after a commit that wrote deliveries, and
by the minute tick for retries, so a retry survives any restart. A worker claims a due
delivery by pushing its next attempt past what its batch may take (`CLAIM_LEASE`) in a
conditional UPDATE, so two workers never send the same attempt, and one that dies mid-attempt
only delays the retry. Receivers must still expect a message twice (`webhook-id` is the same).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import delete, exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.engine.webhooks.events import open_secret
from app.engine.webhooks.signing import sign
from app.engine.webhooks.urls import UrlRefused, pinned, resolve
from app.metrics import WEBHOOK_ATTEMPTS, WEBHOOK_DISABLED
from app.models import WebhookDelivery, WebhookEndpoint
from app.security import WrongSecretKey
from app.values import DeliveryStatus
from app.version import package_version

log = logging.getLogger(__name__)

# The waits after each failed attempt (Standard Webhooks' suggestion): 8 attempts over ~27 h.
RETRY_SCHEDULE: tuple[timedelta, ...] = (
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=10),
)
TIMEOUT_S = 10.0  # a whole attempt: resolving, connecting, sending, the answer's status
BATCH = 50
CONCURRENCY = 10
# Longer than a batch can take (BATCH / CONCURRENCY attempts in a row), so a claimed delivery
# is never claimed again while its attempt may still run.
CLAIM_LEASE = timedelta(seconds=TIMEOUT_S * (BATCH // CONCURRENCY) * 2 + 30)
ENDPOINT_DISABLED = "The endpoint was disabled before this delivery succeeded"
KEEP_LOG = timedelta(days=30)  # finished deliveries stay in the endpoint's log this long
PRUNE_BATCH = 5000


@dataclass(frozen=True)
class DeliverySettings:
    """What tests shorten: the waits between attempts, the timeout, private addresses."""

    retry_schedule: tuple[timedelta, ...] = RETRY_SCHEDULE
    timeout_s: float = TIMEOUT_S
    allow_private: bool = False
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))


@dataclass
class Claimed:
    id: uuid.UUID
    endpoint_id: uuid.UUID
    message_id: str
    event_type: str
    payload: dict[str, Any]
    attempts: int  # before this attempt
    created_at: datetime
    url: str
    secret: str | None  # None: it does not open with the current keys


@dataclass(frozen=True)
class Outcome:
    code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.code is not None and 200 <= self.code < 300


# An attempt's result, as the metrics count it.
SUCCEEDED, RETRYING, GAVE_UP = "succeeded", "retrying", "gave_up"


@dataclass
class Run:
    attempted: int = 0
    succeeded: int = 0
    failed: int = 0  # deliveries that gave up (every attempt failed)
    disabled: list[uuid.UUID] = field(default_factory=list)  # endpoints disabled for failing


async def deliver_due(
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: DeliverySettings,
    client: httpx.AsyncClient | None = None,
) -> Run:
    """Attempt every delivery due now, batch after batch, until none is left."""
    run = Run()
    own = client is None
    http = client or new_client(settings)
    try:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def attempt(item: Claimed) -> tuple[Claimed, Outcome]:
            async with gate:
                try:
                    async with asyncio.timeout(settings.timeout_s):
                        return item, await send(http, item, settings)
                except TimeoutError:
                    return item, Outcome(None, f"No answer within {settings.timeout_s:g} s")

        while batch := await _claim(sessionmaker, settings.now()):
            for item, outcome in await asyncio.gather(*(attempt(i) for i in batch)):
                run.attempted += 1
                disabled = len(run.disabled)
                async with sessionmaker() as session:
                    result = await record(session, item, outcome, settings, run)
                    await session.commit()
                if result is not None:  # committed: counted
                    WEBHOOK_ATTEMPTS.labels(result=result).inc()
                    WEBHOOK_DISABLED.inc(len(run.disabled) - disabled)
    finally:
        if own:
            await http.aclose()
    return run


def new_client(settings: DeliverySettings) -> httpx.AsyncClient:
    # No redirects (a 3xx is a failure), no proxies from the environment, a short timeout.
    return httpx.AsyncClient(timeout=settings.timeout_s, follow_redirects=False, trust_env=False)


async def _claim(sessionmaker: async_sessionmaker[AsyncSession], now: datetime) -> list[Claimed]:
    async with sessionmaker() as session:
        due = (
            select(WebhookDelivery.id)
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .where(
                WebhookDelivery.status == DeliveryStatus.PENDING,
                WebhookDelivery.next_attempt_at <= now,
                WebhookEndpoint.enabled,
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(BATCH)
            .with_for_update(of=WebhookDelivery, skip_locked=True)
        )
        rows = (
            await session.scalars(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(due.scalar_subquery()))
                .values(next_attempt_at=now + CLAIM_LEASE)
                .returning(WebhookDelivery)
            )
        ).all()
        endpoints = {
            e.id: e
            for e in await session.scalars(
                select(WebhookEndpoint).where(WebhookEndpoint.id.in_({r.endpoint_id for r in rows}))
            )
        }
        await session.commit()
    secrets = {endpoint_id: _secret(e) for endpoint_id, e in endpoints.items()}  # once each
    return [
        Claimed(
            row.id,
            row.endpoint_id,
            row.message_id,
            row.event_type,
            row.payload,
            row.attempts,
            row.created_at,
            endpoints[row.endpoint_id].url,
            secrets[row.endpoint_id],
        )
        for row in rows
    ]


def _secret(endpoint: WebhookEndpoint) -> str | None:
    try:
        return open_secret(endpoint)
    except WrongSecretKey:
        return None


async def send(http: httpx.AsyncClient, item: Claimed, settings: DeliverySettings) -> Outcome:
    """One attempt: the URL checked again, the body signed, the answer's status kept (its body
    is not read)."""
    if item.secret is None:
        return Outcome(None, "The signing secret cannot be decrypted (IBP_SECRET_KEY changed?)")
    try:
        target = await resolve(item.url, settings.allow_private)
    except UrlRefused as exc:
        return Outcome(None, f"URL refused: {exc}")
    body = json.dumps(item.payload, separators=(",", ":")).encode()
    timestamp = int(settings.now().timestamp())
    headers = {
        "content-type": "application/json",
        "user-agent": f"ibp-webhooks/{package_version()}",
        "webhook-id": item.message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(item.secret, item.message_id, timestamp, body),
    }
    headers["host"] = target.url.netloc.rpartition("@")[2]
    code: int | None = None
    error = Outcome(None, "No address to connect to")
    for address in target.addresses:  # the next one only when this one cannot be reached
        url, extensions = pinned(target, address)
        try:
            async with http.stream(
                "POST", url, content=body, headers=headers, extensions=extensions
            ) as response:
                code = response.status_code
            break
        except httpx.ConnectError as exc:
            error = Outcome(None, f"Cannot connect: {exc}"[:500])
        except httpx.TimeoutException:
            return Outcome(None, f"No answer within {settings.timeout_s:g} s")
        except httpx.HTTPError as exc:
            return Outcome(None, f"{type(exc).__name__}: {exc}"[:500])
    if code is None:
        return error
    if 200 <= code < 300:
        return Outcome(code, None)
    return Outcome(code, f"HTTP {code}")


async def record(
    session: AsyncSession, item: Claimed, outcome: Outcome, settings: DeliverySettings, run: Run
) -> str | None:
    """The attempt's outcome on its row: SUCCEEDED, RETRYING or GAVE_UP; None when another
    worker recorded it first."""
    now = settings.now()
    attempts = item.attempts + 1
    values: dict[str, Any] = {
        "attempts": attempts,
        "last_attempt_at": now,
        "last_response_code": outcome.code,
        "last_error": outcome.error,
    }
    exhausted = attempts > len(settings.retry_schedule)
    if outcome.ok:
        values |= {"status": DeliveryStatus.SUCCEEDED, "next_attempt_at": None, "completed_at": now}
    elif exhausted:
        values |= {"status": DeliveryStatus.FAILED, "next_attempt_at": None, "completed_at": now}
    else:
        values["next_attempt_at"] = now + settings.retry_schedule[item.attempts]
    recorded = await session.scalar(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == item.id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.attempts == item.attempts,  # not recorded by another worker
        )
        .values(**values)
        .returning(WebhookDelivery.id)
    )
    if recorded is None:
        return None
    if outcome.ok:
        run.succeeded += 1
        return SUCCEEDED
    if not exhausted:
        return RETRYING
    run.failed += 1
    if await _failing_since(session, item) and await _disable_for_failing(
        session, item, outcome, now
    ):
        run.disabled.append(item.endpoint_id)
    return GAVE_UP


async def _failing_since(session: AsyncSession, item: Claimed) -> bool:
    """No delivery to the endpoint succeeded since this one was written: it has failed for as
    long as the whole retry schedule."""
    succeeded = await session.scalar(
        select(
            exists().where(
                WebhookDelivery.endpoint_id == item.endpoint_id,
                WebhookDelivery.status == DeliveryStatus.SUCCEEDED,
                WebhookDelivery.completed_at >= item.created_at,
            )
        )
    )
    return not succeeded


async def _disable_for_failing(
    session: AsyncSession, item: Claimed, outcome: Outcome, now: datetime
) -> bool:
    """True when this disabled the endpoint (False: it was already off, or gone)."""
    endpoint = await session.get(WebhookEndpoint, item.endpoint_id, with_for_update=True)
    if endpoint is None or not endpoint.enabled:
        return False
    attempts = item.attempts + 1
    reason = (
        f"Disabled at {now:%Y-%m-%d %H:%M} UTC: every delivery since "
        f"{item.created_at:%Y-%m-%d %H:%M} UTC failed; {item.event_type} {item.message_id} "
        f"gave up after {attempts} attempt{'' if attempts == 1 else 's'}, the last with: "
        f"{outcome.error}"
    )
    await disable_endpoint(session, endpoint, reason, now)
    log.warning("webhook endpoint %s disabled: %s", endpoint.id, reason)
    return True


async def disable_endpoint(
    session: AsyncSession, endpoint: WebhookEndpoint, reason: str, now: datetime
) -> None:
    """Stop an endpoint: nothing more is sent to it, and its pending deliveries fail."""
    endpoint.enabled, endpoint.disabled_at, endpoint.disabled_reason = False, now, reason
    await session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.endpoint_id == endpoint.id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
        )
        .values(
            status=DeliveryStatus.FAILED,
            next_attempt_at=None,
            completed_at=now,
            last_error=ENDPOINT_DISABLED,
        )
    )


async def next_due(session: AsyncSession) -> datetime | None:
    """When the earliest pending delivery of an enabled endpoint is due."""
    when: datetime | None = await session.scalar(
        select(WebhookDelivery.next_attempt_at)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(WebhookDelivery.status == DeliveryStatus.PENDING, WebhookEndpoint.enabled)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(1)
    )
    return when


async def prune_log(session: AsyncSession, now: datetime) -> int:
    """Forget finished deliveries older than KEEP_LOG, a batch per call (the minute tick)."""
    old = (
        select(WebhookDelivery.id)
        .where(
            WebhookDelivery.status != DeliveryStatus.PENDING,
            WebhookDelivery.completed_at < now - KEEP_LOG,
        )
        .limit(PRUNE_BATCH)
        .scalar_subquery()
    )
    deleted = await session.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(old)))
    return int(deleted.rowcount)  # type: ignore[attr-defined]
