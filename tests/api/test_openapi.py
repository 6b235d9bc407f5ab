"""The committed OpenAPI document matches the app, and every operation documents its errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.auth.deps import admin_user
from app.config import get_settings
from app.main import API_PREFIX, create_app
from app.paths import ROOT

COMMITTED = ROOT / "openapi" / "openapi.json"
REGENERATE = (
    ".venv/bin/python -c \"from app.cli import main; main(['openapi'])\" > openapi/openapi.json"
)
PROBLEM_REF = "#/components/schemas/Problem"
PUBLIC = {("post", "/auth/login"), ("get", "/health"), ("get", "/ready")}
# Operations that can answer 409 (a uniqueness clash, rows still in use, a state conflict).
CONFLICTS = {
    ("post", "/users"),
    ("patch", "/users/{user_id}"),
    ("delete", "/users/{user_id}"),
    ("post", "/locations"),
    ("patch", "/locations/{location_id}"),
    ("delete", "/locations/{location_id}"),
    ("get", "/backup-storages"),  # secrets the current IBP_SECRET_KEY cannot open
    ("get", "/backup-storages/{storage_id}"),
    ("post", "/backup-storages"),
    ("patch", "/backup-storages/{storage_id}"),
    ("post", "/backup-storages/{storage_id}/check"),  # no hypervisor or worker to run it
    ("delete", "/backup-storages/{storage_id}"),
    ("post", "/hypervisors"),
    ("patch", "/hypervisors/{hypervisor_id}"),
    ("delete", "/hypervisors/{hypervisor_id}"),
    ("post", "/instances"),
    ("patch", "/instances/{instance_id}"),
    ("delete", "/instances/{instance_id}"),
    ("post", "/backup-policies/{policy_id}/instances"),
    ("delete", "/backups/{backup_id}"),
}
# Non-admin operations that still answer 403.
FORBIDDEN = {("post", "/backup-policies")}


def _document() -> dict[str, Any]:
    # A JSON round trip, as the file is compared after one.
    return json.loads(json.dumps(create_app(get_settings()).openapi()))


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path.removeprefix(API_PREFIX), op)
        for path, item in document["paths"].items()
        for method, op in item.items()
        if method in {"get", "post", "put", "patch", "delete"}
    ]


def _admin_only() -> set[tuple[str, str]]:
    from fastapi.routing import iter_route_contexts

    def calls(dependant: Any) -> set[Any]:
        found = set()
        for dep in dependant.dependencies:
            found.add(dep.call)
            found |= calls(dep)
        return found

    result = set()
    for route in iter_route_contexts(create_app(get_settings()).routes):
        dependant = getattr(route, "dependant", None)
        if dependant is not None and admin_user in calls(dependant):
            for method in route.methods or ():
                result.add((method.lower(), (route.path or "").removeprefix(API_PREFIX)))
    return result


DOCUMENT = _document()
OPERATIONS = _operations(DOCUMENT)
ADMIN_ONLY = _admin_only()


def test_committed_openapi_document_is_up_to_date() -> None:
    assert COMMITTED.exists(), f"openapi/openapi.json is missing; generate it with: {REGENERATE}"
    committed = json.loads(COMMITTED.read_text())
    assert committed == DOCUMENT, (
        "openapi/openapi.json differs from create_app().openapi(); "
        f"regenerate it with: {REGENERATE}"
    )


def test_every_api_route_is_in_the_document() -> None:
    assert len(OPERATIONS) > 40
    assert len(ADMIN_ONLY) > 20
    documented = {(m, p) for m, p, _ in OPERATIONS}
    assert documented >= ADMIN_ONLY
    assert all(path.startswith(API_PREFIX) for path in DOCUMENT["paths"])


def test_operation_ids_are_unique() -> None:
    ids = [op["operationId"] for _, _, op in OPERATIONS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(("method", "path", "op"), OPERATIONS, ids=lambda v: str(v)[:60])
def test_operation_is_documented(method: str, path: str, op: dict[str, Any]) -> None:
    assert op.get("operationId"), "operationId missing"
    assert op.get("summary"), "summary missing"
    assert op.get("tags"), "tags missing"
    expected: set[int] = set()
    if (method, path) not in PUBLIC:
        expected |= {401, 422}
    if "{" in path:
        expected.add(404)
    if (method, path) in ADMIN_ONLY or (method, path) in FORBIDDEN:
        expected.add(403)
    if (method, path) in CONFLICTS:
        expected.add(409)
    if (method, path) == ("post", "/auth/login"):
        expected |= {401, 422}
    if path != "/health":
        expected.add(503)  # every operation that reaches the database
    responses = op["responses"]
    missing = sorted(s for s in expected if str(s) not in responses)
    assert not missing, f"{method.upper()} {path} does not document {missing}"
    for status, response in responses.items():
        if status.startswith(("4", "5")):
            content = response.get("content", {})
            assert "application/problem+json" in content, f"{status} is not a problem document"
            assert content["application/problem+json"]["schema"] == {"$ref": PROBLEM_REF}
        else:
            assert int(status) < 400


def test_problem_schema_has_rfc9457_members() -> None:
    problem = DOCUMENT["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail"} <= set(problem["properties"])
    assert {"title", "status"} <= set(problem["required"])


def test_bearer_security_scheme_is_documented() -> None:
    schemes = DOCUMENT["components"]["securitySchemes"]
    assert any(s.get("scheme", "").lower() == "bearer" for s in schemes.values())
