"""Backups: scoped lists with filters, read shape, sizes, costs, and dependant-aware deletes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Backup, BackupFile, BackupPolicy, Instance, User
from app.queues import CONTROL_QUEUE
from tests.api.helpers import admin_with_headers, assert_page, assert_problem, user_with_headers
from tests.factories import (
    create_backup,
    create_chain,
    create_hypervisor,
    create_instance,
    create_location,
    create_policy,
)

READ_FIELDS = {
    "id",
    "files_missing_at",
    "restorable",
    "error_detail",
    "verify_error_detail",
    "instance_id",
    "instance_name",
    "policy_id",
    "chain_id",
    "parent_id",
    "type",
    "status",
    "manual",
    "backup_device",
    "size_bytes",
    "size_human",
    "progress",
    "scheduled_for",
    "created_at",
    "started_at",
    "completed_at",
    "error",
    "plan_reason",
    "chain_reset_reason",
    "verified_at",
    "verify_ok",
    "verify_error",
    "files",
    "monthly_cost",
    "hourly_cost",
}
T0 = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)


async def _setup(
    session: AsyncSession, price: str | None = None
) -> tuple[User, dict[str, str], BackupPolicy, Instance]:
    user, headers = await user_with_headers(session)
    location = await create_location(session, backup_price_per_gb_month=price)
    hv = await create_hypervisor(session, location_id=location.id)
    policy = await create_policy(session, user)
    instance = await create_instance(session, user, hypervisor_id=hv.id, backup_policy_id=policy.id)
    return user, headers, policy, instance


async def _chain(
    session: AsyncSession, instance: Instance, statuses: list[str], start: datetime = T0
) -> list[Backup]:
    """A full plus incrementals, a day apart, each the parent of the next."""
    chain = await create_chain(session, instance)
    backups: list[Backup] = []
    for i, status in enumerate(statuses):
        at = start + timedelta(days=i)
        backups.append(
            await create_backup(
                session,
                instance,
                chain_id=chain.id,
                parent_id=backups[-1].id if backups else None,
                type="full" if i == 0 else "incremental",
                status=status,
                scheduled_for=at,
                created_at=at,
            )
        )
    return backups


async def test_backup_read_shape_with_files(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers, policy, instance = await _setup(session)
    backup = await create_backup(session, instance, size_bytes=3 * 1024**3, plan_reason="first")
    session.add(
        BackupFile(
            id=uuid.uuid4(),
            backup_id=backup.id,
            disk_target="vda",
            object_key="k",
            size_bytes=3 * 1024**3,
            sha256="a" * 64,
        )
    )
    await session.flush()
    response = await client.get(f"/backups/{backup.id}", headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == READ_FIELDS
    assert body["instance_id"] == str(instance.id)
    assert body["instance_name"] == instance.name
    assert body["policy_id"] == str(policy.id)
    assert body["type"] == "full"
    assert body["status"] == "completed"
    assert body["size_bytes"] == 3 * 1024**3
    assert body["size_human"] == "3.0 GB"
    assert body["plan_reason"] == "first"
    assert body["restorable"] is True and body["files_missing_at"] is None
    assert body["files"] == [{"disk": "vda", "size_bytes": 3 * 1024**3, "sha256": "a" * 64}]
    assert "object_key" not in response.text


@pytest.mark.parametrize(
    ("size", "human"),
    [
        (None, None),
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KB"),
        (int(12.4 * 1024**3), "12.4 GB"),
        (1024**3, "1.0 GB"),
        (5 * 1024**4, "5.0 TB"),
        (1536 * 1024**2, "1.5 GB"),
    ],
)
async def test_size_human_uses_binary_units(
    client: httpx.AsyncClient, session: AsyncSession, size: int | None, human: str | None
) -> None:
    _, headers, _, instance = await _setup(session)
    backup = await create_backup(session, instance, size_bytes=size)
    body = (await client.get(f"/backups/{backup.id}", headers=headers)).json()
    assert body["size_human"] == human


async def test_costs_are_null_without_a_location_price(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers, _, instance = await _setup(session, price=None)
    backup = await create_backup(session, instance)
    body = (await client.get(f"/backups/{backup.id}", headers=headers)).json()
    assert body["monthly_cost"] is None
    assert body["hourly_cost"] is None


@pytest.mark.parametrize(
    ("price", "size"),
    [("0.05", 12 * 1024**3), ("0.0123", int(12.4 * 1024**3)), ("2", 1), ("0", 1024**3)],
)
async def test_costs_are_gb_times_price_and_hourly_is_monthly_over_730(
    client: httpx.AsyncClient, session: AsyncSession, price: str, size: int
) -> None:
    _, headers, _, instance = await _setup(session, price=price)
    backup = await create_backup(session, instance, size_bytes=size)
    body = (await client.get(f"/backups/{backup.id}", headers=headers)).json()
    monthly = Decimal(size) / Decimal(1024**3) * Decimal(price)
    hourly = monthly / Decimal(730)
    assert isinstance(body["monthly_cost"], str) and isinstance(body["hourly_cost"], str)
    assert Decimal(body["monthly_cost"]) == monthly.quantize(Decimal("0.0001"), ROUND_HALF_UP)
    assert Decimal(body["hourly_cost"]) == hourly.quantize(Decimal("0.000001"), ROUND_HALF_UP)


async def test_12_gb_at_5_cents_costs_60_cents_a_month(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers, _, instance = await _setup(session, price="0.05")
    backup = await create_backup(session, instance, size_bytes=12 * 1024**3)
    body = (await client.get(f"/backups/{backup.id}", headers=headers)).json()
    assert Decimal(body["monthly_cost"]) == Decimal("0.60")
    assert Decimal(body["hourly_cost"]) == (Decimal("0.6") / 730).quantize(Decimal("0.000001"))


async def test_lists_by_policy_and_instance_with_status_and_type_filters(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers, policy, instance = await _setup(session)
    chain = await _chain(session, instance, ["completed", "completed", "failed", "in_progress"])
    other_instance = await create_instance(session, user, backup_policy_id=policy.id)
    other = await create_backup(session, other_instance, status="pending", scheduled_for=T0)
    manual = await create_backup(
        session,
        instance,
        policy_id=None,
        manual=True,
        scheduled_for=T0 - timedelta(days=9),
        created_at=T0 - timedelta(days=9),
    )

    by_instance = await client.get(f"/instances/{instance.id}/backups", headers=headers)
    assert by_instance.status_code == 200
    assert_page(by_instance.json(), total=5)
    # Newest first.
    assert [b["id"] for b in by_instance.json()["items"]] == [
        str(b.id) for b in [*reversed(chain), manual]
    ]

    by_policy = (await client.get(f"/backup-policies/{policy.id}/backups", headers=headers)).json()
    assert by_policy["total"] == 5
    assert {b["id"] for b in by_policy["items"]} == {str(b.id) for b in chain} | {str(other.id)}

    async def ids(url: str, **params: Any) -> set[str]:
        response = await client.get(url, params=params, headers=headers)
        assert response.status_code == 200, response.text
        return {b["id"] for b in response.json()["items"]}

    inst = f"/instances/{instance.id}/backups"
    pol = f"/backup-policies/{policy.id}/backups"
    assert await ids(inst, status="failed") == {str(chain[2].id)}
    assert await ids(inst, type="full") == {str(chain[0].id), str(manual.id)}
    assert await ids(inst, type="incremental", status="completed") == {str(chain[1].id)}
    assert await ids(pol, status="pending") == {str(other.id)}
    assert await ids(pol, status="in_progress", type="incremental") == {str(chain[3].id)}
    assert await ids(pol, status="deleting") == set()
    page = (await client.get(inst, params={"limit": 2, "offset": 1}, headers=headers)).json()
    assert_page(page, total=5, limit=2, offset=1)
    assert [b["id"] for b in page["items"]] == [str(chain[2].id), str(chain[1].id)]
    assert_problem(
        await client.get(inst, params={"status": "lost"}, headers=headers), 422, field="status"
    )
    assert_problem(
        await client.get(pol, params={"type": "diff"}, headers=headers), 422, field="type"
    )


async def test_user_cannot_see_someone_elses_backups(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    _, _, policy, instance = await _setup(session)
    backup = await create_backup(session, instance)
    assert_problem(await client.get(f"/backups/{backup.id}", headers=headers), 404)
    assert_problem(await client.get(f"/instances/{instance.id}/backups", headers=headers), 404)
    assert_problem(await client.get(f"/backup-policies/{policy.id}/backups", headers=headers), 404)
    assert_problem(await client.delete(f"/backups/{backup.id}", headers=headers), 404)
    await session.refresh(backup)
    assert backup.status == "completed"


async def test_admin_sees_and_deletes_any_backup(
    client: httpx.AsyncClient, session: AsyncSession, arq_redis: ArqRedis
) -> None:
    _, headers = await admin_with_headers(session)
    _, _, _, instance = await _setup(session)
    backup = await create_backup(session, instance)
    assert (await client.get(f"/backups/{backup.id}", headers=headers)).status_code == 200
    response = await client.delete(f"/backups/{backup.id}", headers=headers)
    assert response.status_code == 202, response.text
    assert response.json() == {"backup_ids": [str(backup.id)], "status": "deleting"}


async def _queued_deletes(arq_redis: ArqRedis) -> dict[str, tuple[Any, ...]]:
    jobs = await arq_redis.queued_jobs(queue_name=CONTROL_QUEUE)
    return {j.job_id: tuple(j.args) for j in jobs if j.function == "delete_backup_files"}


async def test_deleting_a_full_with_incrementals_is_409_naming_dependants(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers, _, instance = await _setup(session)
    chain = await _chain(session, instance, ["completed", "completed", "completed"])
    response = await client.delete(f"/backups/{chain[0].id}", headers=headers)
    body = assert_problem(response, 409)
    assert body["dependants"] == [str(chain[1].id), str(chain[2].id)]
    for b in chain[1:]:
        assert str(b.id) in body["detail"]
    assert "cascade=true" in body["detail"]
    for b in chain:
        await session.refresh(b)
        assert b.status == "completed"


async def test_cascade_delete_marks_all_deleting_and_enqueues_jobs(
    client: httpx.AsyncClient, session: AsyncSession, arq_redis: ArqRedis
) -> None:
    _, headers, _, instance = await _setup(session)
    chain = await _chain(session, instance, ["completed", "completed", "failed", "completed"])
    response = await client.delete(
        f"/backups/{chain[0].id}", params={"cascade": "true"}, headers=headers
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "deleting"
    expected = [chain[0], chain[1], chain[3]]  # a failed backup is not a dependant
    assert body["backup_ids"] == [str(b.id) for b in expected]
    listed = (await client.get(f"/instances/{instance.id}/backups", headers=headers)).json()
    statuses = {b["id"]: b["status"] for b in listed["items"]}
    for b in expected:
        assert statuses[str(b.id)] == "deleting"
    assert statuses[str(chain[2].id)] == "failed"
    queued = await _queued_deletes(arq_redis)
    for b in expected:
        assert queued.get(f"delete:{b.id}") == (str(b.id),)


async def test_deleting_the_last_incremental_needs_no_cascade(
    client: httpx.AsyncClient, session: AsyncSession, arq_redis: ArqRedis
) -> None:
    _, headers, _, instance = await _setup(session)
    chain = await _chain(session, instance, ["completed", "completed", "completed"])
    response = await client.delete(f"/backups/{chain[2].id}", headers=headers)
    assert response.status_code == 202, response.text
    assert response.json()["backup_ids"] == [str(chain[2].id)]
    middle = await client.delete(f"/backups/{chain[1].id}", headers=headers)
    assert middle.status_code == 202  # its only dependant is already being deleted
    assert f"delete:{chain[2].id}" in await _queued_deletes(arq_redis)
    await session.refresh(chain[0])
    assert chain[0].status == "completed"


async def test_deleting_an_in_progress_backup_is_409(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers, _, instance = await _setup(session)
    backup = await create_backup(session, instance, status="in_progress", progress=40)
    body = assert_problem(await client.delete(f"/backups/{backup.id}", headers=headers), 409)
    assert "in progress" in body["detail"]
    await session.refresh(backup)
    assert backup.status == "in_progress"


async def test_cascade_over_an_in_progress_dependant_is_409(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers, _, instance = await _setup(session)
    chain = await _chain(session, instance, ["completed", "in_progress"])
    response = await client.delete(
        f"/backups/{chain[0].id}", params={"cascade": "true"}, headers=headers
    )
    body = assert_problem(response, 409)
    assert body["backup_ids"] == [str(chain[1].id)]


async def test_deleting_a_backup_twice_is_accepted_again(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers, _, instance = await _setup(session)
    backup = await create_backup(session, instance)
    first = await client.delete(f"/backups/{backup.id}", headers=headers)
    second = await client.delete(f"/backups/{backup.id}", headers=headers)
    assert first.status_code == second.status_code == 202
    assert second.json()["backup_ids"] == [str(backup.id)]


async def test_unknown_backup_is_404(client: httpx.AsyncClient, session: AsyncSession) -> None:
    _, headers = await admin_with_headers(session)
    assert_problem(await client.get(f"/backups/{uuid.uuid4()}", headers=headers), 404)
    assert_problem(await client.delete(f"/backups/{uuid.uuid4()}", headers=headers), 404)


async def test_chain_cannot_be_deleted_under_a_running_incremental(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    instance = await create_instance(session, user)
    full = await create_backup(session, instance, type="full")
    # The running incremental has no chain yet (it is set when it completes) but builds on it.
    await create_backup(
        session,
        instance,
        type="incremental",
        status="in_progress",
        completed_at=None,
        scheduled_for=datetime.now(UTC) + timedelta(minutes=1),
    )
    response = await client.delete(f"/backups/{full.id}?cascade=true", headers=headers)
    assert_problem(response, 409)
    assert "in progress" in response.json()["detail"]
    await session.refresh(full)
    assert full.status == "completed"
