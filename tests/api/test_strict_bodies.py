"""Request bodies take integers and booleans as they are (`"hour": true` is not 1), and names
that people read in lists are never blank nor hold control or bidirectional characters."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from tests.api.helpers import admin_with_headers, assert_problem, create_storage
from tests.factories import create_hypervisor, create_instance, create_location, create_policy

DAILY = {"frequency": "daily", "hour": 2}


@pytest.mark.parametrize(
    ("schedule", "extra", "field"),
    [
        ({"frequency": "daily", "hour": True}, {}, "schedule.hour"),
        ({"frequency": "daily", "hour": False}, {}, "schedule.hour"),
        ({"frequency": "daily", "hour": "3"}, {}, "schedule.hour"),
        ({"frequency": "daily", "hour": 3.0}, {}, "schedule.hour"),
        (DAILY, {"retention_count": True}, "retention_count"),
        (DAILY, {"max_incremental_chain": "2"}, "max_incremental_chain"),
    ],
)
async def test_a_policy_integer_that_is_not_an_integer_is_422(
    client: httpx.AsyncClient,
    session: AsyncSession,
    schedule: dict[str, Any],
    extra: dict[str, Any],
    field: str,
) -> None:
    _, headers = await admin_with_headers(session)
    response = await client.post(
        "/backup-policies", json={"name": "p", "schedule": schedule, **extra}, headers=headers
    )
    assert_problem(response, 422, field=field)


async def test_other_integers_and_booleans_are_strict_too(
    client: httpx.AsyncClient, session: AsyncSession, tmp_path: Any
) -> None:
    admin, headers = await admin_with_headers(session)
    hypervisor = await create_hypervisor(session)
    policy = await create_policy(session, admin)
    storage = await create_storage(
        session,
        kind="ftp",
        config={"host": "ftp.example.com", "port": 21, "username": "u", "path": "/"},
        secrets={"password": "pw"},
    )
    cases = [
        ("PATCH", f"/hypervisors/{hypervisor.id}", {"max_concurrent_backups": True}),
        ("PATCH", f"/backup-policies/{policy.id}", {"retention_count": False}),
        ("PATCH", f"/backup-storages/{storage.id}", {"config": {"tls": 1}}),
        ("PATCH", f"/backup-storages/{storage.id}", {"config": {"port": "2121"}}),
        (
            "POST",
            "/instances",
            {
                "name": "vm",
                "owner_id": str(admin.id),
                "hypervisor_id": str(hypervisor.id),
                "domain_name": "vm",
                "disks": [{"target": "vda", "boot": 1, "size_bytes": 1024}],
            },
        ),
    ]
    for method, path, body in cases:
        response = await client.request(method, path, json=body, headers=headers)
        assert_problem(response, 422)

    # Real integers and booleans still pass.
    ok = await client.patch(
        f"/backup-storages/{storage.id}",
        json={"config": {"tls": True, "password": "given-again"}},  # tls: where secrets go
        headers=headers,
    )
    assert ok.status_code == 200, ok.text


BAD_NAMES = [
    " ",
    "   ",
    "\t",
    "\u3000",  # ideographic space
    "invoice\u202efdp.exe",  # shows as "invoiceexe.pdf"
    "a\u202ab",
    "a\u2066b",
    "a\u200fb",
    "a\u061cb",
    "line\nbreak",
    "bell\x07",
    "a\x7fb",
    "a\u2028b",
]


async def _name_targets(session: AsyncSession) -> list[tuple[str, str, dict[str, Any], str]]:
    """(method, path, body without the name, field) for every kind of name an API writes."""
    admin, _ = await admin_with_headers(session)
    location = await create_location(session)
    hypervisor = await create_hypervisor(session, location_id=location.id)
    instance = await create_instance(session, admin, hypervisor_id=hypervisor.id)
    policy = await create_policy(session, admin)
    storage = await create_storage(session)
    return [
        ("POST", "/backup-policies", {"schedule": DAILY}, "name"),
        ("PATCH", f"/backup-policies/{policy.id}", {}, "name"),
        ("POST", "/locations", {}, "name"),
        ("PATCH", f"/locations/{location.id}", {}, "name"),
        ("POST", "/hypervisors", {"location_id": str(location.id)}, "name"),
        ("PATCH", f"/hypervisors/{hypervisor.id}", {}, "name"),
        (
            "POST",
            "/instances",
            {"owner_id": str(admin.id), "hypervisor_id": str(hypervisor.id), "domain_name": "d"},
            "name",
        ),
        ("PATCH", f"/instances/{instance.id}", {}, "name"),
        ("POST", "/backup-storages", {"kind": "local", "config": {"path": "/srv/b"}}, "name"),
        ("PATCH", f"/backup-storages/{storage.id}", {}, "name"),
        ("POST", "/tokens", {}, "name"),
        ("POST", "/users", {"email": "n@example.com", "password": "long enough pw"}, "name"),
        ("PATCH", f"/users/{admin.id}", {}, "name"),
        ("PATCH", "/me", {}, "name"),
    ]


async def test_names_of_spaces_or_with_control_characters_are_422(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    targets = await _name_targets(session)
    for method, path, body, field in targets:
        for name in BAD_NAMES:
            response = await client.request(
                method, path, json={**body, "name": name}, headers=headers
            )
            problem = assert_problem(response, 422, field=field)
            assert all(e["field"] == field for e in problem["errors"]), (path, name, problem)


async def test_ordinary_names_are_still_accepted(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    for name in ("Daily backups", " padded ", "Ünïcödé 名前 ✓", "שם בעברית", "👩‍💻 team"):
        response = await client.post(
            "/locations", json={"name": f"{name} {uuid.uuid4().hex[:6]}"}, headers=headers
        )
        assert response.status_code == 201, response.text
    me = await client.patch("/me", json={"name": ""}, headers=headers)
    assert me.status_code == 200, me.text
    assert me.json()["name"] == ""
