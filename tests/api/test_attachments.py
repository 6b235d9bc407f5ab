"""Attaching instances to policies: idempotence, one policy per instance, ownership, races."""

from __future__ import annotations

import asyncio
import uuid

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.config import Settings
from app.db import build_sessionmaker
from app.main import create_app
from app.models import Instance
from tests.api.helpers import admin_with_headers, assert_page, assert_problem, user_with_headers
from tests.factories import (
    auth_headers,
    create_backup,
    create_instance,
    create_policy,
    create_user,
)

ALREADY = "Instance is already attached to another backup policy"


async def test_attach_is_201_then_200_unchanged(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    policy = await create_policy(session, user)
    instance = await create_instance(session, user)
    url = f"/backup-policies/{policy.id}/instances"
    first = await client.post(url, json={"instance_id": str(instance.id)}, headers=headers)
    assert first.status_code == 201, first.text
    assert first.json() == {"id": str(instance.id), "name": instance.name, "status": "deployed"}
    again = await client.post(url, json={"instance_id": str(instance.id)}, headers=headers)
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    read = (await client.get(f"/instances/{instance.id}", headers=headers)).json()
    assert read["backup_policy_id"] == str(policy.id)
    count = (await client.get(f"/backup-policies/{policy.id}", headers=headers)).json()
    assert count["instance_count"] == 1
    attached = (await client.get(url, headers=headers)).json()
    assert_page(attached, total=1)
    assert attached["items"][0]["id"] == str(instance.id)


async def test_attaching_an_instance_attached_elsewhere_is_409(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    first = await create_policy(session, user)
    second = await create_policy(session, user)
    instance = await create_instance(session, user, backup_policy_id=first.id)
    response = await client.post(
        f"/backup-policies/{second.id}/instances",
        json={"instance_id": str(instance.id)},
        headers=headers,
    )
    body = assert_problem(response, 409)
    assert body["detail"] == ALREADY
    await session.refresh(instance)
    assert instance.backup_policy_id == first.id


async def test_user_cannot_attach_someone_elses_instance(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    other = await create_user(session)
    policy = await create_policy(session, user)
    theirs = await create_instance(session, other)
    response = await client.post(
        f"/backup-policies/{policy.id}/instances",
        json={"instance_id": str(theirs.id)},
        headers=headers,
    )
    assert_problem(response, 404)
    await session.refresh(theirs)
    assert theirs.backup_policy_id is None


async def test_user_cannot_attach_to_someone_elses_policy(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    other = await create_user(session)
    policy = await create_policy(session, other)
    mine = await create_instance(session, user)
    response = await client.post(
        f"/backup-policies/{policy.id}/instances",
        json={"instance_id": str(mine.id)},
        headers=headers,
    )
    assert_problem(response, 404)


async def test_admin_attaching_an_instance_of_another_owner_is_422(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    owner = await create_user(session)
    other = await create_user(session)
    policy = await create_policy(session, owner)
    instance = await create_instance(session, other)
    response = await client.post(
        f"/backup-policies/{policy.id}/instances",
        json={"instance_id": str(instance.id)},
        headers=headers,
    )
    assert_problem(response, 422, field="instance_id")


async def test_admin_attaches_any_users_instance_to_their_policy(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    owner = await create_user(session)
    policy = await create_policy(session, owner)
    instance = await create_instance(session, owner)
    response = await client.post(
        f"/backup-policies/{policy.id}/instances",
        json={"instance_id": str(instance.id)},
        headers=headers,
    )
    assert response.status_code == 201, response.text


async def test_attaching_an_unknown_instance_is_404(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    policy = await create_policy(session, user)
    response = await client.post(
        f"/backup-policies/{policy.id}/instances",
        json={"instance_id": str(uuid.uuid4())},
        headers=headers,
    )
    assert_problem(response, 404)
    bad = await client.post(
        f"/backup-policies/{policy.id}/instances", json={"instance_id": "nope"}, headers=headers
    )
    assert_problem(bad, 422, field="instance_id")


async def test_attachable_instances_lists_only_the_owners_unattached_ones(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    other = await create_user(session)
    policy = await create_policy(session, user)
    elsewhere = await create_policy(session, user)
    free_a = await create_instance(session, user, name="a-free")
    free_b = await create_instance(session, user, name="b-free")
    await create_instance(session, user, name="c-here", backup_policy_id=policy.id)
    await create_instance(session, user, name="d-there", backup_policy_id=elsewhere.id)
    await create_instance(session, other, name="e-theirs")
    response = await client.get(
        f"/backup-policies/{policy.id}/attachable-instances", headers=headers
    )
    assert response.status_code == 200
    body = response.json()
    assert_page(body, total=2)
    assert [i["id"] for i in body["items"]] == [str(free_a.id), str(free_b.id)]

    # An admin sees the policy owner's instances, not the admin's or anyone else's.
    admin, admin_headers = await admin_with_headers(session)
    await create_instance(session, admin, name="admins")
    as_admin = await client.get(
        f"/backup-policies/{policy.id}/attachable-instances", headers=admin_headers
    )
    assert [i["id"] for i in as_admin.json()["items"]] == [str(free_a.id), str(free_b.id)]


async def test_detach_is_204_and_backups_stay(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    policy = await create_policy(session, user)
    instance = await create_instance(session, user, backup_policy_id=policy.id)
    backup = await create_backup(session, instance)
    url = f"/backup-policies/{policy.id}/instances/{instance.id}"
    response = await client.delete(url, headers=headers)
    assert response.status_code == 204
    read = (await client.get(f"/instances/{instance.id}", headers=headers)).json()
    assert read["backup_policy_id"] is None
    backups = (await client.get(f"/instances/{instance.id}/backups", headers=headers)).json()
    assert [b["id"] for b in backups["items"]] == [str(backup.id)]
    by_policy = (await client.get(f"/backup-policies/{policy.id}/backups", headers=headers)).json()
    assert [b["id"] for b in by_policy["items"]] == [str(backup.id)]
    assert_problem(await client.delete(url, headers=headers), 404)


async def test_detaching_an_instance_of_another_policy_is_404(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    policy = await create_policy(session, user)
    elsewhere = await create_policy(session, user)
    instance = await create_instance(session, user, backup_policy_id=elsewhere.id)
    response = await client.delete(
        f"/backup-policies/{policy.id}/instances/{instance.id}", headers=headers
    )
    assert_problem(response, 404)
    await session.refresh(instance)
    assert instance.backup_policy_id == elsewhere.id


async def test_user_cannot_detach_from_someone_elses_policy(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await user_with_headers(session)
    other = await create_user(session)
    policy = await create_policy(session, other)
    instance = await create_instance(session, other, backup_policy_id=policy.id)
    response = await client.delete(
        f"/backup-policies/{policy.id}/instances/{instance.id}", headers=headers
    )
    assert_problem(response, 404)
    await session.refresh(instance)
    assert instance.backup_policy_id == policy.id


async def test_concurrent_attaches_to_two_policies_let_exactly_one_win(
    committed_engine: AsyncEngine, settings: Settings
) -> None:
    setup: async_sessionmaker[AsyncSession] = build_sessionmaker(committed_engine)
    async with setup() as s:
        user = await create_user(s)
        # Two tokens: one shared token's last_used_at update would serialize the requests.
        tokens = [await auth_headers(s, user), await auth_headers(s, user)]
        first = await create_policy(s, user)
        second = await create_policy(s, user)
        instance = await create_instance(s, user)
        await s.commit()

    async def attach(policy_id: uuid.UUID, headers: dict[str, str]) -> httpx.Response:
        # Each request runs in its own app, with its own sessions on the real engine.
        application = create_app(settings)
        application.state.sessionmaker = build_sessionmaker(committed_engine)
        application.state.arq = None
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t/api/v1") as c:
            return await c.post(
                f"/backup-policies/{policy_id}/instances",
                json={"instance_id": str(instance.id)},
                headers=headers,
            )

    for _ in range(3):
        responses = await asyncio.gather(attach(first.id, tokens[0]), attach(second.id, tokens[1]))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [201, 409], [r.text for r in responses]
        loser = next(r for r in responses if r.status_code == 409)
        assert loser.json()["detail"] == ALREADY
        winner = next(r for r in responses if r.status_code == 201)
        winner_policy = first.id if responses[0] is winner else second.id
        async with committed_engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(Instance.backup_policy_id).where(Instance.id == instance.id)
                )
            ).all()
        assert [r[0] for r in rows] == [winner_policy]
        # Reset for the next round.
        async with committed_engine.begin() as conn:
            await conn.execute(
                Instance.__table__.update()
                .where(Instance.__table__.c.id == instance.id)
                .values(backup_policy_id=None)
            )


async def test_concurrent_attaches_to_the_same_policy_are_201_and_200(
    committed_engine: AsyncEngine, settings: Settings
) -> None:
    setup = build_sessionmaker(committed_engine)
    async with setup() as s:
        user = await create_user(s)
        tokens = [await auth_headers(s, user), await auth_headers(s, user)]
        policy = await create_policy(s, user)
        instance = await create_instance(s, user)
        await s.commit()

    async def attach(headers: dict[str, str]) -> httpx.Response:
        application = create_app(settings)
        application.state.sessionmaker = build_sessionmaker(committed_engine)
        application.state.arq = None
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t/api/v1") as c:
            return await c.post(
                f"/backup-policies/{policy.id}/instances",
                json={"instance_id": str(instance.id)},
                headers=headers,
            )

    responses = await asyncio.gather(attach(tokens[0]), attach(tokens[1]))
    assert sorted(r.status_code for r in responses) == [200, 201], [r.text for r in responses]
