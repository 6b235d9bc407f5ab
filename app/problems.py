"""RFC 9457 problem responses: every error the API sends is rendered here (the HTTP edge)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg.exceptions
import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.db import DATABASE_UNREACHABLE, database_unreachable
from app.errors import DomainError, TooManyRequests

PROBLEM_MEDIA_TYPE = "application/problem+json"
BODY_PARSE_ERROR = "There was an error parsing the body"


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    errors: list[dict[str, Any]] | None = None


def problem_response(
    status: int,
    title: str,
    detail: str | None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def domain_problem(exc: DomainError) -> JSONResponse:
    """The response for a domain error; also sent by the body-size middleware, outside routing."""
    headers: dict[str, str] = {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, TooManyRequests):
        headers["Retry-After"] = str(exc.retry_after)
    return problem_response(exc.status, exc.title, exc.detail, headers or None, **exc.extra)


async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    return domain_problem(exc)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    from http import HTTPStatus

    try:
        title = HTTPStatus(exc.status_code).phrase
    except ValueError:
        title = "Error"
    detail = exc.detail if isinstance(exc.detail, str) else None
    if exc.status_code == 400 and detail == BODY_PARSE_ERROR:
        # FastAPI's answer to a body that is not even text: a validation error like any other.
        return problem_response(
            422,
            "Validation failed",
            "body: the request body could not be parsed",
            errors=[{"field": "body", "message": "could not be parsed", "type": "json_invalid"}],
        )
    return problem_response(exc.status_code, title, detail, exc.headers)


def _field_path(loc: Sequence[Any], body: Any) -> str:
    """A dotted field name; drops "body" and the tag a discriminated union adds ("s3.config")."""
    parts = list(loc[1:]) if loc and loc[0] == "body" else list(loc)
    if loc and loc[0] != "body":
        return ".".join(str(p) for p in parts)
    names: list[str] = []
    node = body
    for i, part in enumerate(parts):
        if isinstance(node, dict):
            following = parts[i + 1] if i + 1 < len(parts) else None
            if part not in node and following is not None and following in node:
                continue  # a union member's tag, not a field of the request
            node = node.get(part) if isinstance(part, str) else None
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = None
        names.append(str(part))
    return ".".join(names) or "body"


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "field": "body"
            if err.get("type") == "json_invalid"  # its loc holds a character position
            else _field_path(tuple(err.get("loc", ())), exc.body),
            "message": err.get("msg", ""),
            "type": err.get("type", ""),
        }
        for err in exc.errors()
    ]
    detail = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors)
    return problem_response(422, "Validation failed", detail, errors=errors)


def _is_bad_data(exc: DBAPIError) -> bool:
    """PostgreSQL refused a value itself (SQLSTATE class 22: NUL in text, out-of-range date)."""
    cause = exc.orig.__cause__ if exc.orig is not None else None
    return isinstance(cause, asyncpg.exceptions.DataError)


# A backing service cannot be reached (or takes no more connections): nothing the client did
# wrong, and worth a retry.
_UNREACHABLE = (
    *DATABASE_UNREACHABLE,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
RETRY_AFTER_SECONDS = 5


async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, redis.exceptions.RedisError):
        what = "its job queue (Redis)"
    elif isinstance(exc, ConnectionError):
        # What asyncpg raises when PostgreSQL refuses connections; in principle another service.
        what = "its database or a service it depends on"
    else:
        what = "its database"
    return problem_response(
        503,
        "Service unavailable",
        f"The API cannot reach {what} right now ({type(exc).__name__}); try again shortly.",
        {"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _unexpected(_: Request, __: Exception) -> JSONResponse:
    """Last resort: still a problem document, never internals (the traceback goes to the log).

    Unreachable services never get here: their own handlers (and _database_error) answer 503.
    """
    return problem_response(500, "Internal server error", "An unexpected error occurred.")


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError)
    if database_unreachable(exc):
        return await _unavailable(request, exc)
    if not _is_bad_data(exc):
        raise exc
    cause = exc.orig.__cause__ if exc.orig is not None else None
    return problem_response(
        422, "Validation failed", f"A value cannot be stored: {cause}".split("\n")[0]
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for unreachable in _UNREACHABLE:
        app.add_exception_handler(unreachable, _unavailable)
    app.add_exception_handler(Exception, _unexpected)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting problem documents for the given statuses."""
    descriptions = {
        400: "Bad request",
        401: "Missing, invalid, expired or revoked token",
        403: "Not allowed for this role",
        404: "Not found (or not yours)",
        409: "Conflict with the current state",
        422: "Validation failed",
        429: "Too many attempts; retry after `Retry-After` s",
    }
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {
            "model": Problem,
            "description": descriptions.get(status, "Error"),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        if status == 429:
            responses[status]["headers"] = {
                "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}
            }
    return responses
