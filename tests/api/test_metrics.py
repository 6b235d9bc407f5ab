"""GET /metrics on the API: Prometheus text format, the catalog's gauges read from PostgreSQL
at scrape, bounded labels, nothing of the tenants, and the optional bearer token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.config import Settings
from app.main import create_app
from tests.factories import (
    create_backup,
    create_hypervisor,
    create_instance,
    create_policy,
    create_restore,
    create_user,
)

# Every label a metric of ours may carry: none names a backup, restore, instance or user.
BOUNDED_LABELS = {"type", "target", "status", "kind", "result", "hypervisor", "policy", "le"}


@pytest.fixture
async def root(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


async def test_metrics_read_the_catalog_in_prometheus_format(
    root: httpx.AsyncClient, session: AsyncSession
) -> None:
    owner = await create_user(session, email="tenant-secret@example.com", name="Tenant Secret")
    hv = await create_hypervisor(session, name="hv-metrics")
    policy = await create_policy(session, owner, name="Secret project policy")
    now = datetime.now(UTC)
    old = await create_instance(
        session, owner, hypervisor_id=hv.id, backup_policy_id=policy.id, name="secret-vm-a"
    )
    recent = await create_instance(
        session, owner, hypervisor_id=hv.id, backup_policy_id=policy.id, name="secret-vm-b"
    )
    never = await create_instance(
        session, owner, hypervisor_id=hv.id, backup_policy_id=policy.id, name="secret-vm-c"
    )
    backups = [
        # The old instance's last good backup is 30 h old; a newer one lost its files.
        await create_backup(session, old, completed_at=now - timedelta(hours=30)),
        await create_backup(
            session,
            old,
            completed_at=now - timedelta(hours=2),
            files_missing_at=now,
            scheduled_for=now - timedelta(hours=2),
        ),
        await create_backup(
            session, recent, completed_at=now - timedelta(hours=1), scheduled_for=now
        ),
        await create_backup(session, never, status="failed", scheduled_for=now - timedelta(days=1)),
        # Queued and running work on the hypervisor.
        await create_backup(
            session,
            never,
            status="pending",
            completed_at=None,
            scheduled_for=now + timedelta(minutes=1),
        ),
        await create_backup(
            session,
            recent,
            status="in_progress",
            completed_at=None,
            scheduled_for=now + timedelta(minutes=2),
        ),
    ]
    restore = await create_restore(session, old, status="pending")
    await session.flush()

    response = await root.get("/metrics")

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert value(text, "ibp_catalog_up") == 1.0
    age = value(text, "ibp_policy_oldest_good_backup_age_seconds", policy=str(policy.id))
    assert age is not None and 30 * 3600 <= age < 30 * 3600 + 120
    assert value(text, "ibp_policy_instances_without_good_backup", policy=str(policy.id)) == 1
    queued = {
        kind: value(text, "ibp_jobs_queued", hypervisor="hv-metrics", kind=kind)
        for kind in ("backup", "restore")
    }
    running = {
        kind: value(text, "ibp_jobs_running", hypervisor="hv-metrics", kind=kind)
        for kind in ("backup", "restore")
    }
    assert queued == {"backup": 1, "restore": 1}
    assert running == {"backup": 1, "restore": 0}
    # The worker-side families are declared here too (this process ran no job).
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"ibp_backups", "ibp_scheduler_tick_duration_seconds", "ibp_storage_checks"} <= names

    # Nothing of the tenants, no per-row label.
    for secret in ("tenant-secret", "Tenant Secret", "Secret project", "secret-vm"):
        assert secret not in text
    for row in [*backups, restore, old, recent, never, owner]:
        assert str(row.id) not in text
    ours = [labels for name, labels in samples(text) if name.startswith("ibp_")]
    labels = {label for key in ours for label, _ in key}
    assert labels <= BOUNDED_LABELS
    assert labels >= {"hypervisor", "policy", "kind"}


async def test_a_drained_queue_reads_zero_and_a_deleted_policy_disappears(
    root: httpx.AsyncClient, session: AsyncSession
) -> None:
    owner = await create_user(session)
    hv = await create_hypervisor(session, name="hv-idle")
    policy = await create_policy(session, owner)
    instance = await create_instance(
        session, owner, hypervisor_id=hv.id, backup_policy_id=policy.id
    )
    await create_backup(session, instance)
    text = (await root.get("/metrics")).text
    assert value(text, "ibp_jobs_queued", hypervisor="hv-idle", kind="backup") == 0
    assert value(text, "ibp_policy_instances_without_good_backup", policy=str(policy.id)) == 0

    instance.backup_policy_id = None
    await session.flush()
    text = (await root.get("/metrics")).text
    assert value(text, "ibp_policy_oldest_good_backup_age_seconds", policy=str(policy.id)) is None


async def test_with_a_metrics_token_only_its_bearer_is_answered(
    settings: Settings, app: FastAPI
) -> None:
    guarded = create_app(settings.model_copy(update={"metrics_token": "scrape-token-1234"}))
    guarded.state.sessionmaker = app.state.sessionmaker
    guarded.state.arq = app.state.arq
    transport = httpx.ASGITransport(app=guarded)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        assert (await c.get("/metrics")).status_code == 401
        wrong = await c.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"] == "Bearer"
        right = await c.get("/metrics", headers={"Authorization": "Bearer scrape-token-1234"})
    assert right.status_code == 200
    assert value(right.text, "ibp_catalog_up") == 1.0


async def test_without_postgresql_the_process_metrics_still_answer(settings: Settings) -> None:
    app = create_app(settings)
    # Nothing listens on port 1: connecting is refused, as with PostgreSQL stopped.
    engine = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1:1/ibp")
    app.state.sessionmaker = async_sessionmaker(engine)
    app.state.arq = object()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            response = await c.get("/metrics")
    finally:
        await engine.dispose()
    assert response.status_code == 200
    assert value(response.text, "ibp_catalog_up") == 0.0
    assert "ibp_jobs_queued" not in response.text
    assert "ibp_backups" in response.text
