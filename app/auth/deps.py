"""Who is asking: the bearer token's user, and the admin-only guard."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth import service
from app.auth.service import Principal
from app.deps import ReadsDep, SessionDep
from app.errors import Forbidden, Unauthorized
from app.models import User

bearer = HTTPBearer(auto_error=False, description="Session token from login, or an API token.")


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("Missing bearer token")
    return credentials.credentials


async def current_user(session: SessionDep, credentials: Credentials) -> User:
    return await service.authenticate(session, _token(credentials))


async def current_principal(reads: ReadsDep, credentials: Credentials) -> Principal:
    """The caller's id and role only, from the read cache or one prepared statement (no ORM:
    for hot list pages)."""
    return await service.authenticate_principal(reads, _token(credentials))


async def admin_user(user: Annotated[User, Depends(current_user)]) -> User:
    if not user.is_admin:
        raise Forbidden("This operation is for administrators only")
    return user


CurrentUser = Annotated[User, Depends(current_user)]
CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
AdminUser = Annotated[User, Depends(admin_user)]
