"""Who is asking: the bearer token and its user, and the admin-only guard."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth import service
from app.deps import SessionDep
from app.errors import Forbidden, Unauthorized
from app.models import User

bearer = HTTPBearer(auto_error=False, description="Session token from login, or an API token.")


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("Missing bearer token")
    return credentials.credentials


async def current_caller(session: SessionDep, credentials: Credentials) -> service.Caller:
    return await service.authenticate(session, _token(credentials))


async def current_user(caller: Annotated[service.Caller, Depends(current_caller)]) -> User:
    return caller.user


async def admin_user(user: Annotated[User, Depends(current_user)]) -> User:
    if not user.is_admin:
        raise Forbidden("This operation is for administrators only")
    return user


CurrentCaller = Annotated[service.Caller, Depends(current_caller)]
CurrentUser = Annotated[User, Depends(current_user)]
AdminUser = Annotated[User, Depends(admin_user)]
