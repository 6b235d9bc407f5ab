from __future__ import annotations

import uuid

from fastapi import APIRouter, status

from app.auth.deps import AdminUser, CurrentCaller, CurrentUser, TokenFirstRoute
from app.deps import SessionDep
from app.problems import problem_responses
from app.schemas import Page, PageDep, page_of
from app.users import service
from app.users.schemas import MeUpdate, PasswordChange, UserCreate, UserRead, UserUpdate

me_router = APIRouter(
    route_class=TokenFirstRoute, prefix="/me", tags=["me"], responses=problem_responses(401, 422)
)
users_router = APIRouter(
    route_class=TokenFirstRoute,
    prefix="/users",
    tags=["users"],
    responses=problem_responses(401, 403, 404, 422),
)


@me_router.get("", summary="Your own profile")
async def get(user: CurrentUser) -> UserRead:
    return UserRead.model_validate(user)


@me_router.patch("", summary="Change your name or time zone")
async def update(payload: MeUpdate, session: SessionDep, user: CurrentUser) -> UserRead:
    return UserRead.model_validate(await service.update_me(session, user, payload))


@me_router.post(
    "/password",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Change your password (ends your other sessions and your personal tokens)",
    responses=problem_responses(403),
)
async def change_password(
    payload: PasswordChange, session: SessionDep, caller: CurrentCaller
) -> None:
    await service.change_password(session, caller, payload)


@users_router.get("", name="list", summary="List users (admin)")
async def list_all(session: SessionDep, _: AdminUser, page: PageDep) -> Page[UserRead]:
    return await page_of(session, service.users_statement(), page, UserRead.model_validate)


@users_router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create a user (admin)",
    responses=problem_responses(409),
)
async def create(payload: UserCreate, session: SessionDep, _: AdminUser) -> UserRead:
    return UserRead.model_validate(await service.create_user(session, payload))


@users_router.get("/{user_id}", summary="Read a user (admin)")
async def read(user_id: uuid.UUID, session: SessionDep, _: AdminUser) -> UserRead:
    return UserRead.model_validate(await service.get_user(session, user_id))


@users_router.patch(
    "/{user_id}", name="update", summary="Update a user (admin)", responses=problem_responses(409)
)
async def update_user(
    user_id: uuid.UUID,
    payload: UserUpdate,
    session: SessionDep,
    _: AdminUser,
    caller: CurrentCaller,
) -> UserRead:
    user = await service.get_user(session, user_id)
    return UserRead.model_validate(await service.update_user(session, user, payload, caller))


@users_router.delete(
    "/{user_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a user (admin)",
    responses=problem_responses(409),
)
async def delete(user_id: uuid.UUID, session: SessionDep, admin: AdminUser) -> None:
    user = await service.get_user(session, user_id)
    await service.delete_user(session, user, admin)
