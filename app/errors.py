"""Domain errors: what went wrong, in the reader's words, with the HTTP status it maps to.

Plain exceptions, raised by services and core alike; only app.problems (the HTTP edge) turns
them into RFC 9457 responses.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    status = 400
    title = "Bad request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class NotFound(DomainError):
    status = 404
    title = "Not found"


class Unauthorized(DomainError):
    status = 401
    title = "Unauthorized"


class Forbidden(DomainError):
    status = 403
    title = "Forbidden"


class Conflict(DomainError):
    status = 409
    title = "Conflict"


class Unprocessable(DomainError):
    status = 422
    title = "Unprocessable content"
