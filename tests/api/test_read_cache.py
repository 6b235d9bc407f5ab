"""The read cache as served: hits really skip the database, and every writer invalidates it.

The app runs through its real lifespan (read pool, change feed) on the test database. A
"silent" write is made with `session_replication_role = replica`, which switches triggers off
for that session only, so it sends no notification: a page that does not show a silent write
was served from the cache. Ordinary writes from another connection stand for the worker (or
another API process): they reach the cache by notification, within moments. Writes through
the API of the same process are read back at once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from app.cache import FEED_APPLICATION_NAME
from app.config import Settings
from app.deps import Reads, asyncpg_dsn
from app.main import create_app
from tests.factories import (
    auth_headers,
    create_admin,
    create_instance,
    create_policy,
    create_user,
)


async def _until(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds} s: {what}")


@asynccontextmanager
async def _served(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as client,
    ):

        async def live() -> bool:
            return bool(app.state.read_cache.live)

        await _until(live, "the change feed is up")
        yield app, client


async def _sql(settings: Settings, statement: str, *args: Any, silent: bool = False) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(settings))
    try:
        if silent:
            await conn.execute("SET session_replication_role = replica")
        await conn.execute(statement, *args)
    finally:
        await conn.close()


async def test_list_pages_are_cached_and_follow_every_writer(
    committed_engine: AsyncEngine, settings: Settings
) -> None:
    maker = async_sessionmaker(committed_engine, expire_on_commit=False)
    async with maker() as session:
        owner, other = await create_user(session), await create_user(session)
        admin = await create_admin(session)
        policy = await create_policy(session, owner, name="first")
        theirs = await create_policy(session, other)
        instance = await create_instance(session, owner)
        headers, admin_headers = (
            await auth_headers(session, owner),
            await auth_headers(session, admin),
        )
        await session.commit()

    async with _served(settings) as (_, client):

        async def mine() -> dict[str, Any]:
            response = await client.get("/backup-policies", headers=headers)
            assert response.status_code == 200
            return response.json()  # type: ignore[no-any-return]

        async def everyone() -> dict[str, Any]:
            response = await client.get("/backup-policies", headers=admin_headers)
            return response.json()  # type: ignore[no-any-return]

        assert (await mine())["items"][0]["name"] == "first"
        assert (await everyone())["total"] == 2
        rename = "UPDATE backup_policies SET name = $2 WHERE id = $1"

        # A hit does not ask the database: a write it is not told about stays unseen.
        await _sql(settings, rename, policy.id, "silent", silent=True)
        assert (await mine())["items"][0]["name"] == "first"

        # Another writer's change arrives by notification (and carries the silent one along).
        await _sql(settings, rename, policy.id, "renamed")

        async def renamed() -> bool:
            return (await mine())["items"][0]["name"] == "renamed"

        await _until(renamed, "the rename is listed")

        async def attached() -> bool:
            return (await mine())["items"][0]["instance_count"] == 1

        await _sql(
            settings,
            "UPDATE instances SET backup_policy_id = $2 WHERE id = $1",
            instance.id,
            policy.id,
        )
        await _until(attached, "the attachment is counted")

        async def in_tokyo() -> bool:
            return (await mine())["items"][0]["timezone"] == "Asia/Tokyo"

        await _sql(settings, "UPDATE users SET timezone = 'Asia/Tokyo' WHERE id = $1", owner.id)
        await _until(in_tokyo, "the owner's new timezone is shown")

        # A change to one policy retires only the pages that show it: the admin's first page
        # (only `theirs`, the newest) survives an edit of `policy`, shown on the second.
        async def admin_page(offset: int, status: str | None = None) -> dict[str, Any]:
            query = {"limit": 1, "offset": offset} | ({"status": status} if status else {})
            response = await client.get("/backup-policies", headers=admin_headers, params=query)
            return response.json()  # type: ignore[no-any-return]

        assert (await admin_page(0))["items"][0]["id"] == str(theirs.id)
        assert (await admin_page(1))["items"][0]["id"] == str(policy.id)
        await _sql(settings, rename, theirs.id, "silent", silent=True)
        await _sql(settings, rename, policy.id, "edited elsewhere")

        async def edited() -> bool:
            return (await admin_page(1))["items"][0]["name"] == "edited elsewhere"

        await _until(edited, "the edit is listed on the page that shows the policy")
        assert (await admin_page(0))["items"][0]["name"] != "silent"

        # A change that moves a policy into a filtered page retires the pages it may join.
        assert (await admin_page(0, "paused"))["total"] == 0
        pause = "UPDATE backup_policies SET status = 'paused' WHERE id = $1"
        await _sql(settings, pause, policy.id)

        async def paused() -> bool:
            return (await admin_page(0, "paused"))["total"] == 1

        await _until(paused, "the paused policy joins the paused page")

        async def one_left() -> bool:
            return (await everyone())["total"] == 1

        await _sql(settings, "DELETE FROM backup_policies WHERE id = $1", theirs.id)
        await _until(one_left, "the admin's page loses another owner's deleted policy")

        # This process's own writes are read back at once, without waiting for anything.
        for n in range(5):
            patched = await client.patch(
                f"/backup-policies/{policy.id}", headers=headers, json={"name": f"mine {n}"}
            )
            assert patched.status_code == 200
            assert (await mine())["items"][0]["name"] == f"mine {n}"
            assert (await everyone())["items"][0]["name"] == f"mine {n}"
        created = await client.post(
            "/backup-policies",
            headers=headers,
            json={"name": "second", "schedule": {"frequency": "daily", "hour": 3}},
        )
        assert created.status_code == 201
        assert (await mine())["total"] == 2 and (await everyone())["total"] == 2


async def test_tokens_are_cached_and_revocation_and_roles_reach_the_cache(
    committed_engine: AsyncEngine, settings: Settings
) -> None:
    maker = async_sessionmaker(committed_engine, expire_on_commit=False)
    async with maker() as session:
        owner, other = await create_user(session), await create_user(session)
        await create_policy(session, owner)
        await create_policy(session, other)
        headers, second = await auth_headers(session, owner), await auth_headers(session, owner)
        await session.commit()

    async with _served(settings) as (_, client):
        assert (await client.get("/backup-policies", headers=headers)).json()["total"] == 1
        await client.get("/backup-policies", headers=second)
        tokens = (await client.get("/tokens", headers=headers)).json()["items"]
        first_id = next(
            t["id"] for t in tokens if headers["Authorization"][7:].startswith(t["prefix"])
        )
        second_id = next(t["id"] for t in tokens if t["id"] != first_id)
        revoke = "UPDATE api_tokens SET revoked_at = now() WHERE id = $1"

        await _sql(settings, revoke, uuid.UUID(first_id), silent=True)
        assert (await client.get("/backup-policies", headers=headers)).status_code == 200

        async def refused() -> bool:
            response = await client.get("/backup-policies", headers=headers)
            return response.status_code == 401 and response.json()["detail"] == (
                "Token has been revoked"
            )

        await _sql(settings, revoke, uuid.UUID(first_id))
        await _until(refused, "the revoked token is refused")

        async def sees_everyone() -> bool:
            response = await client.get("/backup-policies", headers=second)
            return bool(response.json()["total"] == 2)

        await _sql(settings, "UPDATE users SET role = 'admin' WHERE id = $1", owner.id)
        await _until(sees_everyone, "the promoted user lists everyone's policies")

        # Revoked through this process's API: refused on the very next request.
        assert (await client.delete(f"/tokens/{second_id}", headers=second)).status_code == 204
        assert (await client.get("/backup-policies", headers=second)).status_code == 401


async def test_without_its_change_feed_the_cache_steps_aside(
    committed_engine: AsyncEngine, settings: Settings
) -> None:
    maker = async_sessionmaker(committed_engine, expire_on_commit=False)
    async with maker() as session:
        owner = await create_user(session)
        policy = await create_policy(session, owner, name="before")
        headers = await auth_headers(session, owner)
        await session.commit()
    rename = "UPDATE backup_policies SET name = $2 WHERE id = $1"

    async with _served(settings) as (app, client):

        async def name() -> str:
            return str(
                (await client.get("/backup-policies", headers=headers)).json()["items"][0]["name"]
            )

        assert await name() == "before"
        await _sql(
            settings,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            FEED_APPLICATION_NAME,
        )

        async def down() -> bool:
            return not app.state.read_cache.live

        await _until(down, "the lost feed is noticed")
        # While it is down nothing is served from memory: even a silent write shows.
        await _sql(settings, rename, policy.id, "while down", silent=True)
        assert await name() == "while down"

        async def up() -> bool:
            return bool(app.state.read_cache.live)

        await _until(up, "the feed reconnects")
        assert await name() == "while down"
        await _sql(settings, rename, policy.id, "after", silent=True)
        assert await name() == "while down"  # cached again
        await _sql(settings, rename, policy.id, "after")

        async def after() -> bool:
            return await name() == "after"

        await _until(after, "notifications flow again")


async def test_concurrent_misses_of_one_page_ask_the_database_once(
    committed_engine: AsyncEngine, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    maker = async_sessionmaker(committed_engine, expire_on_commit=False)
    async with maker() as session:
        owner = await create_user(session)
        for n in range(3):
            await create_policy(session, owner, name=f"p{n}")
        headers = await auth_headers(session, owner)
        await session.commit()
    reads = []  # every read connection a request takes (a cache hit or a wait takes none)
    connection = Reads.connection

    async def counted(self: Reads) -> asyncpg.Connection:
        reads.append(self)
        return await connection(self)

    monkeypatch.setattr(Reads, "connection", counted)

    async with _served(settings) as (_, client):
        warm = await client.get("/backup-policies", headers=headers, params={"limit": 1})
        assert warm.status_code == 200  # the token is cached; the page below is not

        async def burst() -> list[int]:
            responses = await asyncio.gather(
                *(
                    client.get("/backup-policies", headers=headers, params={"limit": 2})
                    for _ in range(20)
                )
            )
            assert all(r.status_code == 200 for r in responses)
            assert all(r.json() == responses[0].json() for r in responses)
            return [len(r.json()["items"]) for r in responses]

        reads.clear()
        assert await burst() == [2] * 20
        assert len(reads) == 1
        reads.clear()
        assert await burst() == [2] * 20
        assert reads == []  # and then it is cached
