"""A list page costs the same number of queries whether it holds 1 row or 50 (no N+1)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from tests.factories import (
    auth_headers,
    create_backup,
    create_instance,
    create_policy,
    create_user,
)


@contextmanager
def count_queries(connection: AsyncConnection) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(*args: object) -> None:
        statements.append(str(args[2]))

    sync = connection.sync_connection
    assert sync is not None
    event.listen(sync, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(sync, "before_cursor_execute", record)


async def _queries_for(
    client: httpx.AsyncClient, connection: AsyncConnection, url: str, headers: dict[str, str]
) -> int:
    with count_queries(connection) as statements:
        r = await client.get(url, headers=headers)
        assert r.status_code == 200, r.text
    return len([s for s in statements if not s.startswith(("SAVEPOINT", "RELEASE"))])


async def test_policy_and_backup_lists_cost_constant_queries(
    client: httpx.AsyncClient, session: AsyncSession, connection: AsyncConnection
) -> None:
    user = await create_user(session)
    headers = await auth_headers(session, user)
    policy = await create_policy(session, user)
    instance = await create_instance(session, user, backup_policy_id=policy.id)
    await create_backup(session, instance)
    await client.get("/me", headers=headers)  # last_used_at is written once, not per page

    urls = [
        "/backup-policies?limit=50",
        f"/backup-policies/{policy.id}/backups?limit=50",
        f"/instances/{instance.id}/backups?limit=50",
        "/instances?limit=50",
    ]
    small = {url: await _queries_for(client, connection, url, headers) for url in urls}
    for _ in range(49):
        other = await create_policy(session, user)
        vm = await create_instance(session, user, backup_policy_id=other.id)
        await create_instance(session, user, backup_policy_id=other.id)
        vm.backup_policy_id = policy.id
        await create_backup(session, vm, policy_id=policy.id)
    await session.flush()
    large = {url: await _queries_for(client, connection, url, headers) for url in urls}
    assert large == small
