"""Who is asking: the bearer token and its user, and the admin-only guard."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

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


async def current_caller(
    request: Request, session: SessionDep, credentials: Credentials
) -> service.Caller:
    caller: service.Caller | None = getattr(request.state, "caller", None)  # TokenFirstRoute's
    if caller is None:
        caller = await service.authenticate(session, _token(credentials))
    return caller


async def current_user(caller: Annotated[service.Caller, Depends(current_caller)]) -> User:
    return caller.user


async def admin_user(user: Annotated[User, Depends(current_user)]) -> User:
    if not user.is_admin:
        raise Forbidden("This operation is for administrators only")
    return user


CurrentCaller = Annotated[service.Caller, Depends(current_caller)]
CurrentUser = Annotated[User, Depends(current_user)]
AdminUser = Annotated[User, Depends(admin_user)]


def _calls(dependant: Dependant) -> set[Callable[..., Any]]:
    found: set[Callable[..., Any]] = set()
    for dependency in dependant.dependencies:
        if dependency.call is not None:
            found.add(dependency.call)
        found |= _calls(dependency)
    return found


class TokenFirstRoute(APIRoute):
    """The route class of every router: a route that needs a token checks it before the body.

    FastAPI reads and parses a route's body before it resolves any dependency, so the token
    check would come after an anonymous client had the API read and parse up to
    IBP_MAX_BODY_BYTES, and a malformed body would get 422 instead of 401. Here the token's user
    is looked up first, in the request's own session (which `get_session` then takes over, so
    its commit records `last_used_at`), and `current_caller` returns it: still one lookup.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if current_caller not in _calls(self.dependant):
            return handler

        async def token_first(request: Request) -> Response:
            token = _token(await bearer(request))
            session: AsyncSession = request.app.state.sessionmaker()
            request.state.session = session
            try:
                request.state.caller = await service.authenticate(session, token)
                return await handler(request)
            finally:
                # get_session took the session over (it commits and closes it after this
                # returns) unless the request failed before its dependencies ran.
                if getattr(request.state, "session", None) is session:
                    await session.close()

        return token_first
