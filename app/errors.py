"""Domain errors: what went wrong, in the reader's words, with the HTTP status it maps to.

Plain exceptions, raised by services and core alike; only app.problems (the HTTP edge) turns
them into RFC 9457 responses.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
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


class SecretsUndecryptable(Conflict):
    """Stored storage secrets do not open with the current IBP_SECRET_KEY (it was changed or
    is wrong). A conflict between the server's key and its data, not a passing outage: it
    lasts until the old key is back or the secrets are given again."""

    title = "Storage secrets cannot be decrypted"

    def __init__(self, storages: Sequence[tuple[uuid.UUID, str]]) -> None:
        named = ", ".join(f"'{name}' ({storage_id})" for storage_id, name in storages)
        super().__init__(
            f"The secrets of backup storage {named} cannot be decrypted with the current "
            "IBP_SECRET_KEY (nor any of IBP_PREVIOUS_SECRET_KEYS): add the key they were "
            "encrypted with to IBP_PREVIOUS_SECRET_KEYS, or give the secrets again "
            "(PATCH /backup-storages/{id} with the secret fields)."
        )


class ContentTooLarge(DomainError):
    status = 413
    title = "Content too large"


class TooManyRequests(DomainError):
    """Too many attempts for now; `retry_after` says in how many seconds to try again."""

    status = 429
    title = "Too many requests"

    def __init__(self, detail: str, retry_after: int, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.retry_after = retry_after
