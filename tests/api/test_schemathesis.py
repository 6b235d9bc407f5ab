"""Property-based API tests with schemathesis: generated requests for every operation, as an
admin and as a user, must never give a 5xx, an undocumented status code, an undocumented
content type, or a body that does not match the documented schema.

Cases are generated with Hypothesis from the app's own OpenAPI document (derandomized, a
bounded number per operation) and sent through the test `client` app, so every request runs
inside the test's rolled-back transaction. Half of the cases have their path parameters
replaced by ids of real rows, so handlers get past the 404 and into the interesting code.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import User
from tests.api.helpers import admin_with_headers, create_storage, user_with_headers
from tests.factories import (
    PASSWORD,
    create_backup,
    create_chain,
    create_hypervisor,
    create_instance,
    create_location,
    create_policy,
    create_user,
    create_webhook,
)

MAX_EXAMPLES = 10
NEGATIVE_EXAMPLES = 6
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
SKIP_OPERATIONS: set[str] = set()


def _collect(strategy: st.SearchStrategy[schemathesis.Case], n: int) -> list[schemathesis.Case]:
    """Up to n cases from the strategy, the same ones on every run."""
    cases: list[schemathesis.Case] = []

    @settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def gather(case: schemathesis.Case) -> None:
        cases.append(case)

    # An operation without parameters has no negative data: Hypothesis gives up on it.
    with contextlib.suppress(Unsatisfiable):
        gather()
    return cases


async def _seed(session: AsyncSession, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Headers and real path-parameter values for an admin and for a user."""
    admin, admin_headers = await admin_with_headers(session)
    user, user_headers = await user_with_headers(session, timezone="Europe/Berlin")
    location = await create_location(session, backup_price_per_gb_month="0.05")
    storage = await create_storage(session, config={"path": str(tmp_path)})
    hypervisor = await create_hypervisor(
        session, location_id=location.id, backup_storage_id=storage.id
    )
    policy = await create_policy(session, user)
    instance = await create_instance(
        session, user, hypervisor_id=hypervisor.id, backup_policy_id=policy.id
    )
    await create_instance(session, user, hypervisor_id=hypervisor.id)
    chain = await create_chain(session, instance)
    full = await create_backup(session, instance, chain_id=chain.id)
    await create_backup(
        session,
        instance,
        chain_id=chain.id,
        parent_id=full.id,
        type="incremental",
        scheduled_for=full.scheduled_for.replace(year=full.scheduled_for.year + 1),
        created_at=full.created_at.replace(year=full.created_at.year + 1),
    )
    bystander: User = await create_user(session)
    webhook = await create_webhook(session, user)
    ids = {
        "policy_id": policy.id,
        "instance_id": instance.id,
        "backup_id": full.id,
        "user_id": bystander.id,
        "location_id": location.id,
        "storage_id": storage.id,
        "hypervisor_id": hypervisor.id,
        "webhook_id": webhook.id,
    }
    return (
        {"headers": admin_headers, "ids": ids, "user": admin},
        {"headers": user_headers, "ids": ids, "user": user},
    )


def _request_kwargs(case: schemathesis.Case, headers: dict[str, str]) -> dict[str, Any]:
    kwargs = case.as_transport_kwargs(base_url="http://test", headers=headers)
    request: dict[str, Any] = {
        "method": kwargs["method"],
        "url": kwargs["url"],
        "headers": {k: str(v) for k, v in (kwargs.get("headers") or {}).items()},
        "params": kwargs.get("params"),
    }
    if kwargs.get("cookies"):
        request["cookies"] = kwargs["cookies"]
    if "json" in kwargs:
        request["content"] = json.dumps(kwargs["json"]).encode()
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        request["content"] = data if isinstance(data, bytes) else str(data).encode()
    return request


async def _run(
    app: FastAPI,
    session: AsyncSession,
    tmp_path: Path,
    role: str,
    mode: GenerationMode = GenerationMode.POSITIVE,
    max_examples: int = MAX_EXAMPLES,
) -> tuple[int, list[str]]:
    admin, user = await _seed(session, tmp_path)
    who = admin if role == "admin" else user
    schema = schemathesis.openapi.from_dict(app.openapi())
    failures: list[str] = []
    sent = 0
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for result in schema.get_all_operations():
            operation = result.ok()
            label = operation.label
            if label in SKIP_OPERATIONS:
                continue
            cases = _collect(operation.as_strategy(mode), max_examples)
            for index, case in enumerate(cases):
                if index % 2 == 1 and case.path_parameters:
                    for name in list(case.path_parameters):
                        if name in who["ids"]:
                            case.path_parameters[name] = str(who["ids"][name])
                        elif name == "token_id":
                            # A spare token: revoking the one in use would end the run.
                            spare = await client.post(
                                "/api/v1/tokens",
                                json={"name": "spare", "current_password": PASSWORD},
                                headers=who["headers"],
                            )
                            case.path_parameters[name] = spare.json()["id"]
                request = _request_kwargs(case, who["headers"])
                try:
                    response = await client.request(**request)
                except Exception as exc:  # an unhandled exception is a 500 the client never saw
                    failures.append(f"{label} raised {exc!r}\n  request: {request}")
                    continue
                sent += 1
                try:
                    case.validate_response(response, checks=CHECKS)
                except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup
                    failures.append(f"{label}: {exc}\n  request: {request}")
    return sent, failures


@pytest.mark.parametrize(
    ("role", "mode", "examples"),
    [
        ("admin", GenerationMode.POSITIVE, MAX_EXAMPLES),
        ("user", GenerationMode.POSITIVE, MAX_EXAMPLES),
        ("admin", GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES),
        ("user", GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES),
    ],
    ids=["admin-positive", "user-positive", "admin-negative", "user-negative"],
)
async def test_generated_requests_conform_to_the_schema(
    app: FastAPI,
    session: AsyncSession,
    tmp_path: Path,
    role: str,
    mode: GenerationMode,
    examples: int,
) -> None:
    sent, failures = await _run(app, session, tmp_path, role, mode, examples)
    assert sent > 200
    assert not failures, f"{len(failures)} failures:\n\n" + "\n\n".join(failures[:10])


def test_bounded_examples_are_deterministic(app: FastAPI) -> None:
    schema = schemathesis.openapi.from_dict(app.openapi())
    operation = schema["/api/v1/backup-policies"]["POST"]
    first = [c.body for c in _collect(operation.as_strategy(), 5)]
    second = [c.body for c in _collect(operation.as_strategy(), 5)]
    assert first == second
