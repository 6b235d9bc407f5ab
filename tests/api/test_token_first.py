"""The bearer token is checked before the request body is read: an anonymous client gets 401,
never a 422 about its body, and the API does not read the body at all."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import iter_route_contexts
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.deps import current_caller
from app.config import get_settings
from app.main import API_PREFIX, create_app
from tests.api.helpers import Upload, assert_problem, user_with_headers

MALFORMED = b'{"name": '
JSON = {"Content-Type": "application/json"}


def _calls(dependant: Dependant) -> set[Any]:
    found = set()
    for dep in dependant.dependencies:
        found.add(dep.call)
        found |= _calls(dep)
    return found


def _token_routes_with_a_body() -> list[tuple[str, str]]:
    found = []
    for route in iter_route_contexts(create_app(get_settings()).routes):
        if getattr(route, "body_field", None) is None or current_caller not in _calls(
            route.dependant
        ):
            continue
        path = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), route.path.removeprefix(API_PREFIX))
        found.extend((method, path) for method in sorted(route.methods or ()))
    return found


ROUTES = _token_routes_with_a_body()


def test_routes_were_found() -> None:
    assert len(ROUTES) > 15


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=lambda v: str(v)[:50])
async def test_no_token_and_a_malformed_body_is_401(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, path, content=MALFORMED, headers=JSON)
    assert_problem(response, 401)


async def test_no_token_and_a_large_allowed_body_is_401_unread(
    client: httpx.AsyncClient,
) -> None:
    upload = Upload(512 * 1024, chunk=65536)
    response = await client.post("/backup-policies", content=upload, headers=JSON)
    assert_problem(response, 401)
    assert upload.sent == 0


async def test_a_wrong_token_is_401_unread_and_a_right_one_reads_the_body(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    upload = Upload(512 * 1024, chunk=65536)
    wrong = {**JSON, "Authorization": "Bearer ibpt_not-a-token"}
    response = await client.post("/backup-policies", content=upload, headers=wrong)
    assert_problem(response, 401)
    assert upload.sent == 0

    _, headers = await user_with_headers(session)
    response = await client.post("/backup-policies", content=MALFORMED, headers={**headers, **JSON})
    assert_problem(response, 422, field="body")
