"""Cost estimates (POST /backup-policies/estimate, and a policy's detail) against figures
computed by hand from the rows below."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Instance, Location, User
from tests.api.helpers import admin_with_headers, assert_problem, user_with_headers
from tests.factories import (
    create_backup,
    create_hypervisor,
    create_instance,
    create_location,
    create_policy,
)

MIB, GIB = 1024**2, 1024**3
T0 = datetime(2026, 11, 1, 2, tzinfo=UTC)


def at(day: int) -> dict[str, datetime]:
    when = T0 + timedelta(days=day)
    return {"created_at": when, "scheduled_for": when, "completed_at": when}


async def located(session: AsyncSession, owner: User, location: Location, **kw: Any) -> Instance:
    hypervisor = await create_hypervisor(session, location_id=location.id)
    return await create_instance(session, owner, hypervisor_id=hypervisor.id, **kw)


@dataclass
class Fleet:
    owner: User
    headers: dict[str, str]
    cheap: Location  # 0.05 per GB-month
    dear: Location  # 0.10
    unpriced: Location
    alpha: Instance  # cheap; 10 GiB boot + 20 GiB data; backups of both devices
    beta: Instance  # dear; 50 GiB boot + 100 GiB data; no backups
    gamma: Instance  # unpriced; 1 GiB boot; no backups


@pytest.fixture
async def fleet(session: AsyncSession) -> Fleet:
    owner, headers = await user_with_headers(session)
    cheap = await create_location(session, name="cheap", backup_price_per_gb_month="0.05")
    dear = await create_location(session, name="dear", backup_price_per_gb_month="0.10")
    unpriced = await create_location(session, name="unpriced")
    alpha = await located(
        session,
        owner,
        cheap,
        name="alpha",
        disks=[
            {"target": "vda", "boot": True, "size_bytes": 10 * GIB},
            {"target": "vdb", "boot": False, "size_bytes": 20 * GIB},
        ],
    )
    beta = await located(
        session,
        owner,
        dear,
        name="beta",
        disks=[
            {"target": "vda", "boot": True, "size_bytes": 50 * GIB},
            {"target": "vdb", "boot": False, "size_bytes": 100 * GIB},
        ],
    )
    gamma = await located(
        session,
        owner,
        unpriced,
        name="gamma",
        disks=[{"target": "vda", "boot": True, "size_bytes": GIB}],
    )
    # alpha's history. Boot disk only: fulls of 3 then 4 GiB (the latest counts), incrementals
    # of 100, 300 and 200 MiB (median 200), a failed one without a size.
    await create_backup(session, alpha, size_bytes=3 * GIB, **at(0))
    for day, size in ((1, 100), (2, 300), (3, 200)):
        await create_backup(session, alpha, type="incremental", size_bytes=size * MIB, **at(day))
    await create_backup(session, alpha, type="incremental", status="failed", size_bytes=None)
    await create_backup(session, alpha, size_bytes=4 * GIB, **at(4))
    # Every disk: one full of 25 GiB and one incremental of 999 MiB.
    await create_backup(session, alpha, backup_device="all", size_bytes=25 * GIB, **at(5))
    await create_backup(
        session, alpha, backup_device="all", type="incremental", size_bytes=999 * MIB, **at(6)
    )
    return Fleet(owner, headers, cheap, dear, unpriced, alpha, beta, gamma)


def body(*instances: Instance, **settings: Any) -> dict[str, Any]:
    return {
        "schedule": {"frequency": "daily", "hour": 2},
        "instance_ids": [str(i.id) for i in instances],
        **settings,
    }


async def test_estimate_of_an_instance_with_history_and_one_without_in_two_locations(
    client: httpx.AsyncClient, fleet: Fleet
) -> None:
    r = await client.post(
        "/backup-policies/estimate",
        json=body(fleet.beta, fleet.alpha, max_incremental_chain=6, retention_count=3),
        headers=fleet.headers,
    )
    assert r.status_code == 200, r.text
    est = r.json()
    assert (est["chains"], est["incrementals_per_chain"]) == (3, 6)
    alpha, beta = est["instances"]  # by name
    # alpha: its latest full (4 GiB) and the median incremental (200 MiB), 3 chains of 1 + 6.
    assert alpha == {
        "instance_id": str(fleet.alpha.id),
        "name": "alpha",
        "location_id": str(fleet.cheap.id),
        "full_bytes": 4 * GIB,
        "full_basis": "measured",
        "incremental_bytes": 200 * MIB,
        "incremental_basis": "measured",
        "measured_incrementals": 3,
        "stored_bytes": 3 * (4096 + 6 * 200) * MIB,  # 15888 MiB
    }
    # beta: no history: its 50 GiB boot disk, incrementals of 2% of it (1 GiB).
    assert beta["full_bytes"] == 50 * GIB and beta["full_basis"] == "allocated"
    assert beta["incremental_bytes"] == GIB and beta["incremental_basis"] == "assumed"
    assert beta["measured_incrementals"] == 0
    assert beta["stored_bytes"] == 3 * (50 + 6) * GIB  # 168 GiB
    assert est["stored_bytes"] == 15888 * MIB + 168 * GIB
    # 15888 MiB = 15.515625 GiB x 0.05 = 0.77578125; 168 GiB x 0.10 = 16.8.
    assert est["locations"] == [
        {
            "location_id": str(fleet.cheap.id),
            "name": "cheap",
            "price_per_gb_month": "0.05",
            "stored_bytes": 15888 * MIB,
            "monthly_cost": "0.7758",
        },
        {
            "location_id": str(fleet.dear.id),
            "name": "dear",
            "price_per_gb_month": "0.1",
            "stored_bytes": 168 * GIB,
            "monthly_cost": "16.8000",
        },
    ]
    assert est["monthly_cost"] == "17.5758"  # 17.57578125
    words = " ".join(est["assumptions"])
    assert "3 chain(s)" in words and "6 incremental(s)" in words
    assert "median" in words and "2%" in words and "2^30" in words
    assert "of the boot disk" in words
    assert "No backup price" not in words


async def test_estimate_of_every_disk_weekly_with_a_location_without_price(
    client: httpx.AsyncClient, fleet: Fleet
) -> None:
    r = await client.post(
        "/backup-policies/estimate",
        json=body(
            fleet.gamma,
            fleet.alpha,
            schedule={"frequency": "weekly", "hour": 3, "day_of_week": "monday"},
            max_incremental_chain=10,
            retention_count=2,
            backup_device="all",
        ),
        headers=fleet.headers,
    )
    assert r.status_code == 200, r.text
    est = r.json()
    # Weekly: the full comes back every Monday, so 6 incrementals at most.
    assert (est["chains"], est["incrementals_per_chain"]) == (2, 6)
    alpha, gamma = est["instances"]
    # alpha, every disk: only the backups of every disk count (25 GiB full, 999 MiB inc).
    assert (alpha["full_bytes"], alpha["incremental_bytes"]) == (25 * GIB, 999 * MIB)
    assert alpha["measured_incrementals"] == 1
    assert alpha["stored_bytes"] == 2 * (25600 + 6 * 999) * MIB  # 63188 MiB
    # gamma: 1 GiB allocated; 2% of it rounded down: 21474836 bytes.
    assert (gamma["full_bytes"], gamma["incremental_bytes"]) == (GIB, 21_474_836)
    assert gamma["stored_bytes"] == 2 * (GIB + 6 * 21_474_836) == 2_405_181_680
    cheap, unpriced = est["locations"]
    # 63188 MiB = 61.70703125 GiB x 0.05 = 3.0853515625.
    assert (cheap["name"], cheap["monthly_cost"]) == ("cheap", "3.0854")
    assert unpriced["name"] == "unpriced"
    assert unpriced["price_per_gb_month"] is None and unpriced["monthly_cost"] is None
    assert unpriced["stored_bytes"] == 2_405_181_680
    assert est["monthly_cost"] is None  # one location has no price
    assert any("No backup price in location(s) unpriced" in a for a in est["assumptions"])
    assert any("of every disk" in a for a in est["assumptions"])
    assert est["stored_bytes"] == 63188 * MIB + 2_405_181_680


async def test_full_only_estimate_keeps_fulls_alone(
    client: httpx.AsyncClient, fleet: Fleet
) -> None:
    r = await client.post(
        "/backup-policies/estimate",
        json=body(fleet.beta, max_incremental_chain=0, retention_count=7),
        headers=fleet.headers,
    )
    est = r.json()
    assert est["incrementals_per_chain"] == 0
    assert est["stored_bytes"] == 7 * 50 * GIB
    assert est["monthly_cost"] == "35.0000"  # 350 GiB x 0.10


async def test_user_cannot_estimate_with_someone_elses_instance(
    client: httpx.AsyncClient, session: AsyncSession, fleet: Fleet
) -> None:
    other, other_headers = await user_with_headers(session)
    theirs = await create_instance(session, other)
    r = await client.post(
        "/backup-policies/estimate", json=body(fleet.alpha, theirs), headers=fleet.headers
    )
    assert_problem(r, 404)
    r = await client.post(
        "/backup-policies/estimate", json=body(fleet.alpha), headers=other_headers
    )
    assert_problem(r, 404)
    unknown = {**body(fleet.alpha), "instance_ids": [str(uuid.uuid4())]}
    assert_problem(
        await client.post("/backup-policies/estimate", json=unknown, headers=fleet.headers), 404
    )
    # An admin may estimate with anyone's instances.
    _, admin_headers = await admin_with_headers(session)
    r = await client.post(
        "/backup-policies/estimate", json=body(fleet.alpha, theirs), headers=admin_headers
    )
    assert r.status_code == 200, r.text


async def test_an_instance_being_deleted_cannot_be_estimated(
    client: httpx.AsyncClient, session: AsyncSession, fleet: Fleet
) -> None:
    fleet.gamma.deleting_at = datetime.now(UTC)
    await session.flush()
    r = await client.post(
        "/backup-policies/estimate", json=body(fleet.gamma), headers=fleet.headers
    )
    assert_problem(r, 404)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"schedule": {"frequency": "weekly", "hour": 3}}, "schedule"),
        ({"schedule": {"frequency": "daily", "hour": 24}}, "hour"),
        ({"retention_count": 0}, "retention_count"),
        ({"max_incremental_chain": 31}, "max_incremental_chain"),
        ({"max_incremental_chain": "3"}, "max_incremental_chain"),
        ({"backup_device": "boot"}, "backup_device"),
        ({"instance_ids": []}, "instance_ids"),
        ({"instance_ids": ["not-a-uuid"]}, "instance_ids"),
        ({"name": "a policy"}, "name"),  # an estimate has no name: unknown field
    ],
)
async def test_bad_estimate_requests_are_422_naming_the_field(
    client: httpx.AsyncClient, fleet: Fleet, change: dict[str, Any], field: str
) -> None:
    r = await client.post(
        "/backup-policies/estimate", json={**body(fleet.alpha), **change}, headers=fleet.headers
    )
    assert_problem(r, 422, field=field)


async def test_duplicate_and_missing_instance_ids_are_422(
    client: httpx.AsyncClient, fleet: Fleet
) -> None:
    twice = body(fleet.alpha, fleet.alpha)
    r = await client.post("/backup-policies/estimate", json=twice, headers=fleet.headers)
    assert_problem(r, 422, field="instance_ids")
    r = await client.post(
        "/backup-policies/estimate",
        json={"schedule": {"frequency": "daily", "hour": 2}},
        headers=fleet.headers,
    )
    assert_problem(r, 422, field="instance_ids")


async def test_policy_detail_shows_its_estimate_next_to_what_it_stores(
    client: httpx.AsyncClient, session: AsyncSession, fleet: Fleet
) -> None:
    policy = await create_policy(
        session, fleet.owner, max_incremental_chain=2, retention_count=2, backup_device="primary"
    )
    kept = await located(
        session,
        fleet.owner,
        fleet.cheap,
        name="kept",
        backup_policy_id=policy.id,
        disks=[{"target": "vda", "boot": True, "size_bytes": 8 * GIB}],
    )
    # A manual full without a policy, older than the policy's: stored, but not under it.
    await create_backup(session, kept, policy_id=None, manual=True, size_bytes=5 * GIB, **at(0))
    await create_backup(session, kept, size_bytes=GIB, **at(1))
    for day, size in ((2, 100), (3, 300)):
        await create_backup(session, kept, type="incremental", size_bytes=size * MIB, **at(day))
    await create_backup(session, kept, type="incremental", status="failed", size_bytes=None)
    await create_backup(session, kept, type="incremental", status="deleting", size_bytes=MIB)
    # Backups under the policy of an instance detached since: not the policy's any more.
    left = await located(session, fleet.owner, fleet.dear, name="left")
    await create_backup(session, left, policy_id=policy.id, size_bytes=7 * GIB, **at(1))

    r = await client.get(f"/backup-policies/{policy.id}", headers=fleet.headers)
    assert r.status_code == 200, r.text
    detail = r.json()
    assert detail["instance_count"] == 1
    assert detail["stored_bytes"] == GIB + 400 * MIB  # the full and two incrementals
    est = detail["estimate"]
    assert (est["chains"], est["incrementals_per_chain"]) == (2, 2)
    (only,) = est["instances"]
    assert only["name"] == "kept"
    # Latest full 1 GiB, median of 100 and 300 MiB (the deleting one is not completed): 200.
    assert (only["full_bytes"], only["incremental_bytes"]) == (GIB, 200 * MIB)
    assert est["stored_bytes"] == 2 * (1024 + 2 * 200) * MIB  # 2848 MiB
    assert est["monthly_cost"] == "0.1391"  # 2.78125 GiB x 0.05 = 0.1390625
    # The list shows the same policy without these two.
    listed = (await client.get("/backup-policies", headers=fleet.headers)).json()["items"]
    assert {k: detail[k] for k in listed[0]} == listed[0]
    assert set(detail) - set(listed[0]) == {"estimate", "stored_bytes"}


async def test_detail_of_a_policy_without_instances_estimates_nothing(
    client: httpx.AsyncClient, session: AsyncSession, fleet: Fleet
) -> None:
    policy = await create_policy(session, fleet.owner)
    detail = (await client.get(f"/backup-policies/{policy.id}", headers=fleet.headers)).json()
    assert detail["stored_bytes"] == 0
    est = detail["estimate"]
    assert (est["stored_bytes"], est["monthly_cost"]) == (0, "0.0000")
    assert est["instances"] == [] and est["locations"] == []
