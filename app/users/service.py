"""Users: admin management, self-service profile, and the idempotent first admin."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.service import Caller, confirm_identity, revoke_all
from app.errors import Conflict, NotFound
from app.models import BackupPolicy, Instance, User
from app.policies.service import replan_owner_policies
from app.security import hash_password_in_thread, verify_password_in_thread
from app.users.schemas import MeUpdate, PasswordChange, UserCreate, UserUpdate
from app.values import Role


def users_statement() -> Select[User]:
    return select(User).order_by(User.created_at, User.id)


async def get_user(session: AsyncSession, user_id: uuid.UUID) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise NotFound("User not found")
    return user


async def _ensure_email_free(
    session: AsyncSession, email: str, except_id: uuid.UUID | None
) -> None:
    clash = await session.scalar(select(User.id).where(User.email == email))
    if clash is not None and clash != except_id:
        raise Conflict(f"A user with email {email} already exists")


async def create_user(session: AsyncSession, payload: UserCreate) -> User:
    email = payload.email.lower()
    await _ensure_email_free(session, email, None)
    user = User(
        id=uuid.uuid4(),
        email=email,
        name=payload.name,
        password_hash=await hash_password_in_thread(payload.password),
        role=payload.role,
        timezone=payload.timezone,
    )
    session.add(user)
    await session.flush()
    return user


async def update_user(
    session: AsyncSession, user: User, payload: UserUpdate, acting: Caller
) -> User:
    """An admin's change. A new password or disabling ends all the user's sessions and tokens
    (the admin's own calling token survives a change to the admin's own password)."""
    if payload.email is not None:
        email = payload.email.lower()
        await _ensure_email_free(session, email, user.id)
        user.email = email
    end_credentials = False
    if payload.password is not None:
        user.password_hash = await hash_password_in_thread(payload.password)
        end_credentials = True
    if payload.disabled is True and not user.disabled:
        if user.id == acting.user.id:
            raise Conflict("You cannot disable your own account")
        if user.is_admin:
            await _keep_an_admin(session, user)
        user.disabled_at = datetime.now(UTC)
        end_credentials = True
    elif payload.disabled is False:
        user.disabled_at = None
    if end_credentials:
        keep = acting.token.id if user.id == acting.user.id else None
        await revoke_all(session, user.id, keep=keep)
    if payload.role is not None:
        if user.is_admin and payload.role != Role.ADMIN:
            await _keep_an_admin(session, user)
        user.role = payload.role
    if payload.name is not None:
        user.name = payload.name
    if payload.timezone is not None:
        await set_timezone(session, user, payload.timezone)
    await session.flush()
    return user


async def update_me(session: AsyncSession, user: User, payload: MeUpdate) -> User:
    if payload.name is not None:
        user.name = payload.name
    if payload.timezone is not None:
        await set_timezone(session, user, payload.timezone)
    await session.flush()
    return user


async def change_password(session: AsyncSession, caller: Caller, payload: PasswordChange) -> None:
    """The user's own change: every other session and every personal token ends (a reset after
    a compromise must lock the intruder out); the session or token making the change survives,
    its holder having just proved the password."""
    await confirm_identity(caller, payload.current_password)
    caller.user.password_hash = await hash_password_in_thread(payload.new_password)
    await revoke_all(session, caller.user.id, keep=caller.token.id)


async def set_timezone(session: AsyncSession, user: User, zone: str) -> None:
    if zone != user.timezone:
        user.timezone = zone
        await replan_owner_policies(session, user)


async def delete_user(session: AsyncSession, user: User, acting: User) -> None:
    if user.id == acting.id:
        raise Conflict("You cannot delete your own account")
    instances = await session.scalar(select(func.count()).where(Instance.owner_id == user.id))
    policies = await session.scalar(select(func.count()).where(BackupPolicy.owner_id == user.id))
    if instances or policies:
        raise Conflict(
            f"User owns {instances} instance(s) and {policies} backup policy(ies); "
            "delete or reassign them first"
        )
    if user.is_admin:
        await _keep_an_admin(session, user)
    await session.delete(user)


async def _keep_an_admin(session: AsyncSession, user: User) -> None:
    """Refuse to take admin `user` out of the admins (demoted, disabled, deleted) when no other
    active admin would be left: nobody could manage users, hypervisors or storages any more
    (short of the CLI on the server).

    Every admin row is locked first (in id order, so two such changes cannot deadlock): of two
    admins demoting or deleting each other at once, the second waits for the first to commit,
    then sees what it left. FOR NO KEY UPDATE, so rows that merely reference a user (a new
    policy, a token) are not held up.
    """
    admins = await session.scalars(
        select(User.id)
        .where(User.role == Role.ADMIN, User.disabled_at.is_(None))
        .order_by(User.id)
        .with_for_update(key_share=True)
    )
    if not any(admin_id != user.id for admin_id in admins):
        raise Conflict(f"{user.email} is the only admin; make another user admin first")


async def ensure_admin(session: AsyncSession, email: str, password: str) -> tuple[User, bool]:
    """Create the admin, or make an existing account admin with this password. Idempotent."""
    email = email.strip().lower()
    user = await session.scalar(select(User).where(User.email == email))
    if user is None:
        user = await create_user(
            session,
            UserCreate(email=email, password=password, role=Role.ADMIN, name="Administrator"),
        )
        return user, True
    user.role = Role.ADMIN
    # The operator's way back into the service: the account works again, and whoever held its
    # sessions or tokens before a reset does not. The same password again (scripts/dev runs
    # this at every start) is no reset: the admin's tokens keep working.
    user.disabled_at = None
    if not await verify_password_in_thread(password, user.password_hash):
        user.password_hash = await hash_password_in_thread(password)
        await revoke_all(session, user.id, keep=None)
    return user, False
