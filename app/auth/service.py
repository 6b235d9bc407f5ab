"""Login, bearer-token authentication, login sessions and personal API tokens.

Every way a user's credentials end (logout, a revoked session, a password change, a disabled
account) sets `revoked_at` on token rows, and `authenticate` reads that row on every request,
so an ended credential answers 401 from the next request on.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis
from sqlalchemy import Select, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app import ratelimit
from app.auth.schemas import ApiTokenCreate
from app.errors import Conflict, Forbidden, NotFound, TooManyRequests, Unauthorized, Unprocessable
from app.models import ApiToken, User
from app.ratelimit import Limit
from app.security import (
    DUMMY_PASSWORD_HASH,
    FRESH_LOGIN_MINUTES,
    PERSONAL_PREFIX,
    SESSION_PREFIX,
    new_token,
    token_digest,
    verify_password_in_thread,
)
from app.values import TokenKind

# last_used_at is refreshed at most this often, so reads do not each cost a write.
LAST_USED_RESOLUTION = timedelta(minutes=1)
PREFIX_CHARS = 12
FRESH_LOGIN = timedelta(minutes=FRESH_LOGIN_MINUTES)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Caller:
    """Who is asking, and with which token (a login session or a personal token)."""

    user: User
    token: ApiToken


@dataclass(frozen=True)
class LoginThrottle:
    """How many logins are tried: every attempt per client address, failures per account.

    The address limit bounds the password checks one client can cause; the account limit stops
    guessing spread over many addresses, and counts failures only, in a short window, so that
    someone else's wrong guesses keep an account's owner out for one window at most.
    Unknown emails are counted like known ones: a 429 reveals no account.
    """

    redis: Redis
    per_address: Limit
    per_account_failures: Limit

    async def admit(self, address: str, email: str) -> None:
        wait = await ratelimit.hit(self.redis, f"ibp:login:address:{address}", self.per_address)
        if wait is not None:
            raise TooManyRequests(
                f"Too many login attempts from your address; try again in {wait} s", wait
            )
        wait = await ratelimit.exhausted(self.redis, _account_key(email), self.per_account_failures)
        if wait is not None:
            raise TooManyRequests(
                f"Too many failed logins for this account; try again in {wait} s", wait
            )

    async def failed(self, email: str) -> None:
        await ratelimit.hit(self.redis, _account_key(email), self.per_account_failures)


def _account_key(email: str) -> str:
    # A digest: emails stay out of Redis, and every key has the same length.
    return f"ibp:login:account:{hashlib.sha256(email.encode()).hexdigest()}"


async def login(
    session: AsyncSession,
    throttle: LoginThrottle,
    address: str,
    email: str,
    password: str,
    lifetime: timedelta,
) -> tuple[str, datetime]:
    email = email.strip().lower()
    await throttle.admit(address, email)
    user = await session.scalar(select(User).where(User.email == email))
    password_hash = user.password_hash if user is not None else DUMMY_PASSWORD_HASH
    if not await verify_password_in_thread(password, password_hash) or user is None:
        await throttle.failed(email)
        raise Unauthorized("Wrong email or password")
    if user.disabled:
        # Said only to someone who knows the password: it reveals nothing to a guesser.
        raise Unauthorized("This account is disabled")
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


async def authenticate(session: AsyncSession, token: str) -> Caller:
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
    if user.disabled:
        raise Unauthorized("This account is disabled")
    if api_token.last_used_at is None or now - api_token.last_used_at > LAST_USED_RESOLUTION:
        await session.execute(
            update(ApiToken).where(ApiToken.id == api_token.id).values(last_used_at=now)
        )
    return Caller(user=user, token=api_token)


async def revoke_all(session: AsyncSession, user_id: uuid.UUID, *, keep: uuid.UUID | None) -> None:
    """End every live token of the user, sessions and personal tokens alike, but `keep`.

    Called when the password changes or the account is disabled: whoever held a session or a
    token before must not keep the account.
    """
    stmt = update(ApiToken).where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
    if keep is not None:
        stmt = stmt.where(ApiToken.id != keep)
    await session.execute(stmt.values(revoked_at=_now()))


# --- login sessions ---------------------------------------------------------------------------


def live_sessions(user: User) -> Select[ApiToken]:
    """The user's login sessions that still work (revoked and expired ones are not listed)."""
    return select(ApiToken).where(
        ApiToken.user_id == user.id,
        ApiToken.kind == TokenKind.SESSION,
        ApiToken.revoked_at.is_(None),
        ApiToken.expires_at > _now(),
    )


def logout(caller: Caller) -> None:
    if caller.token.kind != TokenKind.SESSION:
        raise Conflict(
            "This is a personal API token, not a login session: "
            "revoke it with DELETE /tokens/{token_id}"
        )
    caller.token.revoked_at = _now()


async def revoke_session(session: AsyncSession, user: User, session_id: uuid.UUID) -> None:
    row = await session.scalar(live_sessions(user).where(ApiToken.id == session_id))
    if row is None:
        raise NotFound("Session not found")
    row.revoked_at = _now()


# --- personal tokens --------------------------------------------------------------------------


async def confirm_identity(caller: Caller, current_password: str | None) -> None:
    """Refuse a sensitive change unless the caller proves to be the account's owner now.

    Either the password is given, or the request comes from a login session created within
    FRESH_LOGIN.
    """
    if current_password is not None:
        if not await verify_password_in_thread(current_password, caller.user.password_hash):
            raise Forbidden("current_password is wrong")
        return
    token = caller.token
    if token.kind == TokenKind.SESSION and _now() - token.created_at < FRESH_LOGIN:
        return
    raise Forbidden(
        "Give your current password (current_password), or log in again: "
        f"a login session may do this without it for {FRESH_LOGIN_MINUTES} minutes"
    )


def _expiry_error(field: str, message: str, kind: str) -> Unprocessable:
    return Unprocessable(
        f"{field}: {message}", errors=[{"field": field, "message": message, "type": kind}]
    )


def _expires_at(payload: ApiTokenCreate, now: datetime, max_days: int | None) -> datetime | None:
    """The token's expiry from the request, within the administrator's maximum if one is set."""
    if payload.expires_at is not None and payload.expires_in_days is not None:
        raise _expiry_error(
            "expires_in_days", "give expires_at or expires_in_days, not both", "both"
        )
    field = "expires_in_days" if payload.expires_in_days is not None else "expires_at"
    if payload.expires_in_days is not None:
        expires_at: datetime | None = now + timedelta(days=payload.expires_in_days)
    elif payload.expires_at is not None:
        expires_at = payload.expires_at
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)
        if expires_at <= now:
            raise _expiry_error("expires_at", "must be in the future", "past")
    else:
        expires_at = None
    if max_days is not None:
        if expires_at is None:
            raise _expiry_error(
                field, f"required: tokens expire within {max_days} days here", "missing"
            )
        if expires_at > now + timedelta(days=max_days):
            raise _expiry_error(
                field, f"must be within {max_days} days (the administrator's maximum)", "too_far"
            )
    return expires_at


async def create_token(
    session: AsyncSession, user: User, payload: ApiTokenCreate, *, max_days: int | None
) -> tuple[ApiToken, str]:
    expires_at = _expires_at(payload, _now(), max_days)
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
