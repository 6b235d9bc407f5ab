"""Login, bearer-token authentication and personal API tokens."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import Select, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.schemas import ApiTokenCreate
from app.errors import NotFound, Unauthorized, Unprocessable
from app.models import ApiToken, User
from app.security import (
    DUMMY_PASSWORD_HASH,
    PERSONAL_PREFIX,
    SESSION_PREFIX,
    new_token,
    token_digest,
    verify_password,
)
from app.values import TokenKind

# last_used_at is refreshed at most this often, so reads do not each cost a write.
LAST_USED_RESOLUTION = timedelta(minutes=1)
PREFIX_CHARS = 12


def _now() -> datetime:
    return datetime.now(UTC)


async def login(
    session: AsyncSession, email: str, password: str, lifetime: timedelta
) -> tuple[str, datetime]:
    user = await session.scalar(select(User).where(User.email == email.strip().lower()))
    if user is None:
        verify_password(password, DUMMY_PASSWORD_HASH)
        raise Unauthorized("Wrong email or password")
    if not verify_password(password, user.password_hash):
        raise Unauthorized("Wrong email or password")
    token = new_token(SESSION_PREFIX)
    expires_at = _now() + lifetime
    session.add(_token_row(user.id, TokenKind.SESSION, "login session", token, expires_at))
    return token, expires_at


def _token_row(
    user_id: uuid.UUID, kind: str, name: str, token: str, expires_at: datetime | None
) -> ApiToken:
    return ApiToken(
        id=uuid.uuid4(),
        user_id=user_id,
        kind=kind,
        name=name,
        token_hash=token_digest(token),
        prefix=token[:PREFIX_CHARS],
        created_at=_now(),
        expires_at=expires_at,
    )


# Built once, the digest a bound parameter: SQLAlchemy reuses its compiled form.
_TOKEN_USER = (
    select(ApiToken, User)
    .join(User, User.id == ApiToken.user_id)
    .where(ApiToken.token_hash == bindparam("digest"))
)


async def authenticate(session: AsyncSession, token: str) -> User:
    """The token's user, read from the database on every request (revocation is seen at once)."""
    row = (await session.execute(_TOKEN_USER, {"digest": token_digest(token)})).first()
    now = _now()
    if row is None:
        raise Unauthorized("Invalid token")
    api_token, user = row
    if api_token.revoked_at is not None:
        raise Unauthorized("Token has been revoked")
    if api_token.expires_at is not None and api_token.expires_at <= now:
        raise Unauthorized("Token has expired")
    if api_token.last_used_at is None or now - api_token.last_used_at > LAST_USED_RESOLUTION:
        await session.execute(
            update(ApiToken).where(ApiToken.id == api_token.id).values(last_used_at=now)
        )
    return user


async def create_token(
    session: AsyncSession, user: User, payload: ApiTokenCreate
) -> tuple[ApiToken, str]:
    if payload.expires_at is not None:
        expires_at = payload.expires_at
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)
        if expires_at <= _now():
            raise Unprocessable(
                "expires_at: must be in the future",
                errors=[
                    {"field": "expires_at", "message": "must be in the future", "type": "past"}
                ],
            )
    else:
        expires_at = None
    token = new_token(PERSONAL_PREFIX)
    row = _token_row(user.id, TokenKind.PERSONAL, payload.name, token, expires_at)
    session.add(row)
    await session.flush()
    return row, token


def personal_tokens(user: User) -> Select[ApiToken]:
    """The user's live personal tokens (login sessions are not listed)."""
    return select(ApiToken).where(
        ApiToken.user_id == user.id,
        ApiToken.kind == TokenKind.PERSONAL,
        ApiToken.revoked_at.is_(None),
    )


async def revoke_token(session: AsyncSession, user: User, token_id: uuid.UUID) -> None:
    row = await session.scalar(personal_tokens(user).where(ApiToken.id == token_id))
    if row is None:
        raise NotFound("Token not found")
    row.revoked_at = _now()
