from __future__ import annotations

import uuid
from datetime import timedelta

from fastapi import APIRouter, Request, Response, status

from app.auth import service
from app.auth.deps import CurrentCaller, CurrentUser, TokenFirstRoute
from app.auth.schemas import (
    AccessToken,
    ApiTokenCreate,
    ApiTokenCreated,
    ApiTokenRead,
    LoginRequest,
    SessionRead,
)
from app.config import Settings
from app.deps import SessionDep
from app.models import ApiToken
from app.problems import problem_responses
from app.ratelimit import Limit
from app.schemas import Page, PageDep, page_of

auth_router = APIRouter(
    route_class=TokenFirstRoute,
    prefix="/auth",
    tags=["auth"],
    responses=problem_responses(401, 422),
)
tokens_router = APIRouter(
    route_class=TokenFirstRoute,
    prefix="/tokens",
    tags=["tokens"],
    responses=problem_responses(401, 404, 422),
)


# A response carrying a token must not be kept by a browser or a proxy cache.
NO_STORE = {"Cache-Control": "no-store"}


def _login_throttle(request: Request) -> service.LoginThrottle:
    settings: Settings = request.app.state.settings
    return service.LoginThrottle(
        redis=request.app.state.arq,
        per_address=Limit(
            settings.login_attempts_per_address, settings.login_address_window_seconds
        ),
        per_account_failures=Limit(
            settings.login_failures_per_account, settings.login_account_window_seconds
        ),
    )


@auth_router.post(
    "/login", summary="Log in and get a session token", responses=problem_responses(429)
)
async def login(
    payload: LoginRequest, session: SessionDep, request: Request, response: Response
) -> AccessToken:
    # Behind a reverse proxy this is the proxy's address unless uvicorn is told to trust its
    # X-Forwarded-For (--proxy-headers --forwarded-allow-ips).
    address = request.client.host if request.client else "unknown"
    hours = request.app.state.settings.session_lifetime_hours
    token, expires_at = await service.login(
        session,
        _login_throttle(request),
        address,
        payload.email,
        payload.password,
        timedelta(hours=hours),
    )
    response.headers.update(NO_STORE)
    return AccessToken(access_token=token, expires_at=expires_at)


@auth_router.post(
    "/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="End the login session making the request",
    responses=problem_responses(409),
)
async def logout(caller: CurrentCaller) -> None:
    service.logout(caller)


@auth_router.get("/sessions", summary="List your live login sessions")
async def list_sessions(
    session: SessionDep, caller: CurrentCaller, page: PageDep
) -> Page[SessionRead]:
    stmt = service.live_sessions(caller.user).order_by(ApiToken.created_at.desc(), ApiToken.id)

    def item(row: ApiToken) -> SessionRead:
        return SessionRead(
            id=row.id,
            prefix=row.prefix,
            created_at=row.created_at,
            expires_at=row.expires_at,
            last_used_at=row.last_used_at,
            current=row.id == caller.token.id,
        )

    return await page_of(session, stmt, page, item)


@auth_router.delete(
    "/sessions/{session_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="End one of your login sessions",
    responses=problem_responses(404),
)
async def delete_session(session_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> None:
    await service.revoke_session(session, user, session_id)


@tokens_router.get("", name="list", summary="List your personal API tokens")
async def list_all(session: SessionDep, user: CurrentUser, page: PageDep) -> Page[ApiTokenRead]:
    stmt = service.personal_tokens(user).order_by(ApiToken.created_at.desc(), ApiToken.id)
    return await page_of(session, stmt, page, ApiTokenRead.model_validate)


@tokens_router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create a personal API token (shown once)",
    description="Needs `current_password` unless called with a login session a few minutes "
    "old. When the administrator set a maximum lifetime (IBP_MAX_TOKEN_DAYS), the token must "
    "expire within it.",
    responses=problem_responses(403),
)
async def create(
    payload: ApiTokenCreate,
    session: SessionDep,
    caller: CurrentCaller,
    request: Request,
    response: Response,
) -> ApiTokenCreated:
    await service.confirm_identity(caller, payload.current_password)
    max_days = request.app.state.settings.max_token_days
    row, token = await service.create_token(session, caller.user, payload, max_days=max_days)
    response.headers.update(NO_STORE)
    return ApiTokenCreated(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        created_at=row.created_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        token=token,
    )


@tokens_router.delete(
    "/{token_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Revoke a personal API token"
)
async def delete(token_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> None:
    await service.revoke_token(session, user, token_id)
