from __future__ import annotations

from datetime import datetime

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from tests.factories import (
    auth_headers,
    create_backup,
    create_chain,
    create_instance,
    create_policy,
    create_user,
)


async def test_preview_of_a_new_chain_in_the_owners_zone(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session, timezone="America/New_York")
    policy = await create_policy(session, user, hour=2, max_incremental_chain=2)
    r = await client.get(
        f"/backup-policies/{policy.id}/schedule-preview?count=7",
        headers=await auth_headers(session, user),
    )
    assert r.status_code == 200, r.text
    runs = r.json()
    assert [run["type"] for run in runs] == ["full", "incremental", "incremental"] * 2 + ["full"]
    for run in runs:
        local = datetime.fromisoformat(run["local_time"])
        assert local.hour in (2, 3)  # 3:00 only on the spring-forward day
        assert datetime.fromisoformat(run["at"]) == local


async def test_weekly_preview_skips_days_when_the_chain_is_full(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session, timezone="Europe/London")
    policy = await create_policy(
        session, user, frequency="weekly", day_of_week="friday", max_incremental_chain=1
    )
    r = await client.get(
        f"/backup-policies/{policy.id}/schedule-preview?count=6",
        headers=await auth_headers(session, user),
    )
    runs = r.json()
    assert len(runs) == 6
    fulls = [datetime.fromisoformat(x["local_time"]) for x in runs if x["type"] == "full"]
    assert all(d.strftime("%A") == "Friday" for d in fulls[1:])
    days = [datetime.fromisoformat(x["local_time"]).date() for x in runs]
    assert len(set(days)) == 6


async def test_preview_for_an_instance_continues_its_real_chain(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user = await create_user(session)
    policy = await create_policy(session, user, max_incremental_chain=3)
    instance = await create_instance(session, user, backup_policy_id=policy.id)
    chain = await create_chain(session, instance)
    full = await create_backup(session, instance, chain_id=chain.id, type="full")
    await create_backup(
        session,
        instance,
        chain_id=chain.id,
        parent_id=full.id,
        type="incremental",
        scheduled_for=datetime(2026, 1, 2, 2, tzinfo=full.scheduled_for.tzinfo),
    )
    headers = await auth_headers(session, user)
    r = await client.get(
        f"/backup-policies/{policy.id}/schedule-preview?count=4&instance_id={instance.id}",
        headers=headers,
    )
    assert [x["type"] for x in r.json()] == ["incremental", "incremental", "full", "incremental"]

    other = await create_instance(session, user)
    r = await client.get(
        f"/backup-policies/{policy.id}/schedule-preview?instance_id={other.id}", headers=headers
    )
    assert r.status_code == 422
