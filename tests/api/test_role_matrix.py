"""Every endpoint, enumerated from the app's routes: 401 without a token, 403 for users on
admin-only endpoints, 404 for a user acting on another user's rows."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import iter_route_contexts
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.deps import admin_user, current_caller
from app.config import get_settings
from app.main import API_PREFIX, create_app
from tests.api.helpers import admin_with_headers, assert_problem, user_with_headers
from tests.factories import (
    PASSWORD,
    create_backup,
    create_instance,
    create_policy,
    create_restore,
    create_webhook,
    login_session,
)

# Endpoints anyone may call: login, the probes and the API's documentation pages.
PUBLIC = {
    ("POST", "/auth/login"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
}


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # relative to API_PREFIX
    admin_only: bool
    authenticated: bool

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def _calls(dependant: Dependant) -> set[Any]:
    found = set()
    for dep in dependant.dependencies:
        found.add(dep.call)
        found |= _calls(dep)
    return found


def _endpoints() -> list[Endpoint]:
    found = []
    for route in iter_route_contexts(create_app(get_settings()).routes):
        dependant = getattr(route, "dependant", None)
        path = route.path or ""
        if dependant is None or not path.startswith(API_PREFIX):
            continue  # docs and the OpenAPI document
        calls = _calls(dependant)
        for method in sorted(route.methods or ()):
            found.append(
                Endpoint(
                    method=method,
                    path=path.removeprefix(API_PREFIX),
                    admin_only=admin_user in calls,
                    authenticated=current_caller in calls,
                )
            )
    return found


ENDPOINTS = _endpoints()
PROTECTED = [e for e in ENDPOINTS if (e.method, e.path) not in PUBLIC]
ADMIN_ONLY = [e for e in ENDPOINTS if e.admin_only]
USER_SCOPED = [e for e in PROTECTED if not e.admin_only and "{" in e.path]


def _fill(path: str, values: dict[str, Any]) -> str:
    """The path with sample values; an id nobody owns for parameters without one."""

    def sub(match: re.Match[str]) -> str:
        return str(values.get(match.group(1), uuid.uuid4()))

    return re.sub(r"\{(\w+)\}", sub, path)


def test_routes_are_enumerated() -> None:
    assert len(ENDPOINTS) > 40
    assert {str(e) for e in ADMIN_ONLY} >= {"GET /users", "POST /instances", "GET /locations"}
    # Every endpoint but the public ones depends on the bearer token's check.
    unguarded = [str(e) for e in PROTECTED if not e.authenticated]
    assert unguarded == []
    assert {
        "DELETE /backups/{backup_id}",
        "DELETE /tokens/{token_id}",
        "DELETE /auth/sessions/{session_id}",
    } <= {str(e) for e in USER_SCOPED}


async def test_every_protected_endpoint_is_401_without_a_valid_token(
    client: httpx.AsyncClient,
) -> None:
    failures = []
    for endpoint in PROTECTED:
        values = {name: uuid.uuid4() for name in re.findall(r"\{(\w+)\}", endpoint.path)}
        url = _fill(endpoint.path, values)
        for headers in ({}, {"Authorization": "Bearer ibpt_garbage"}, {"Authorization": "Basic x"}):
            response = await client.request(endpoint.method, url, headers=headers)
            if (
                response.status_code != 401
                or not response.headers["content-type"].startswith("application/problem+json")
                or response.headers.get("www-authenticate") != "Bearer"
            ):
                failures.append(f"{endpoint} {headers}: {response.status_code} {response.text}")
    assert failures == []


async def test_every_admin_only_endpoint_is_403_for_users(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    own_instance = await create_instance(session, user)
    failures = []
    for endpoint in ADMIN_ONLY:
        # Even on the user's own rows (e.g. PATCH /instances/{own}) the answer is 403.
        values: dict[str, Any] = {
            name: uuid.uuid4() for name in re.findall(r"\{(\w+)\}", endpoint.path)
        }
        if "instance_id" in values:
            values["instance_id"] = own_instance.id
        if "user_id" in values:
            values["user_id"] = user.id
        response = await client.request(
            endpoint.method, _fill(endpoint.path, values), headers=headers
        )
        if response.status_code != 403:
            failures.append(f"{endpoint}: {response.status_code} {response.text}")
        else:
            assert_problem(response, 403)
    assert failures == []
    await session.refresh(own_instance)


# Bodies that pass validation, so the ownership check is what answers.
BODIES: dict[str, dict[str, Any]] = {
    "PATCH /backup-policies/{policy_id}": {"name": "stolen"},
    "POST /backups/{backup_id}/restore": {"target": "new_disk"},
    "PATCH /webhooks/{webhook_id}": {"description": "stolen"},
}


async def test_user_acting_on_someone_elses_rows_is_404_everywhere(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    user, headers = await user_with_headers(session)
    own_instance = await create_instance(session, user)
    failures = []
    for endpoint in USER_SCOPED:
        other, other_headers = await user_with_headers(session)
        policy = await create_policy(session, other)
        instance = await create_instance(session, other, backup_policy_id=policy.id)
        backup = await create_backup(session, instance)
        token = (
            await client.post(
                "/tokens", json={"name": "t", "current_password": PASSWORD}, headers=other_headers
            )
        ).json()
        restore = await create_restore(session, instance, backup_id=backup.id)
        login, login_headers = await login_session(session, other)
        webhook = await create_webhook(session, other)
        values = {
            "policy_id": policy.id,
            "instance_id": instance.id,
            "backup_id": backup.id,
            "token_id": token["id"],
            "restore_id": restore.id,
            "session_id": login.id,
            "webhook_id": webhook.id,
        }
        body = BODIES.get(str(endpoint))
        if str(endpoint) == "POST /backup-policies/{policy_id}/instances":
            body = {"instance_id": str(own_instance.id)}
        response = await client.request(
            endpoint.method, _fill(endpoint.path, values), headers=headers, json=body
        )
        if response.status_code != 404:
            failures.append(f"{endpoint}: {response.status_code} {response.text}")
            continue
        assert_problem(response, 404)
        # Nothing changed for the owner.
        await session.refresh(instance)
        await session.refresh(backup)
        await session.refresh(policy)
        assert instance.backup_policy_id == policy.id, endpoint
        assert backup.status == "completed", endpoint
        assert policy.name != "stolen", endpoint
        await session.refresh(webhook)
        assert webhook.description != "stolen", endpoint
        listed = await client.get("/tokens", headers=other_headers)
        assert token["id"] in [t["id"] for t in listed.json()["items"]], endpoint
        assert (await client.get("/me", headers=login_headers)).status_code == 200, endpoint
    assert failures == []


async def test_admin_reads_other_users_rows(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    other, _ = await user_with_headers(session)
    policy = await create_policy(session, other)
    instance = await create_instance(session, other, backup_policy_id=policy.id)
    backup = await create_backup(session, instance)
    restore = await create_restore(session, instance, backup_id=backup.id)
    webhook = await create_webhook(session, other)
    values = {
        "policy_id": policy.id,
        "instance_id": instance.id,
        "backup_id": backup.id,
        "restore_id": restore.id,
        "webhook_id": webhook.id,
    }
    failures = []
    for endpoint in USER_SCOPED:
        params = set(re.findall(r"\{(\w+)\}", endpoint.path))
        if endpoint.method != "GET" or not params <= set(values):
            continue
        response = await client.get(_fill(endpoint.path, values), headers=headers)
        if response.status_code != 200:
            failures.append(f"{endpoint}: {response.status_code} {response.text}")
    assert failures == []


def test_admin_only_set_matches_the_issue(app: FastAPI) -> None:
    admin_paths = {e.path.split("/")[1] for e in ADMIN_ONLY}
    assert admin_paths == {"users", "locations", "backup-storages", "hypervisors", "instances"}
    # Users may read their own instances.
    assert not any(e.method == "GET" and e.path.startswith("/instances") for e in ADMIN_ONLY)
