"""Login throttling, counted in the real Redis: every attempt per client address, failures
per account (short window), 429 problem documents with Retry-After."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from tests.api.helpers import assert_problem
from tests.factories import PASSWORD, create_user

ClientFrom = Callable[[str], AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def throttled(app: FastAPI, settings: Settings) -> FastAPI:
    app.state.settings = settings.model_copy(
        update={
            "login_attempts_per_address": 6,
            "login_address_window_seconds": 60,
            "login_failures_per_account": 2,
            "login_account_window_seconds": 2,
        }
    )
    return app


@pytest.fixture
def client_from(throttled: FastAPI) -> ClientFrom:
    """A client calling from the given address (each test its own: the counters are real)."""

    @asynccontextmanager
    async def client(address: str) -> AsyncIterator[httpx.AsyncClient]:
        transport = httpx.ASGITransport(app=throttled, client=(address, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as c:
            yield c

    return client


def _address() -> str:
    n = uuid.uuid4().int
    return f"10.{n % 256}.{(n >> 8) % 256}.{(n >> 16) % 256}"


def _retry_after(response: httpx.Response, window: int) -> int:
    assert_problem(response, 429)
    seconds = int(response.headers["retry-after"])
    assert 1 <= seconds <= window, seconds
    return seconds


async def test_an_address_gets_429_after_its_attempts_whatever_the_password(
    client_from: ClientFrom, session: AsyncSession
) -> None:
    user = await create_user(session)
    async with client_from(_address()) as client:
        for i in range(6):
            response = await client.post(
                "/auth/login", json={"email": f"nobody{i}@example.com", "password": "wrong"}
            )
            assert_problem(response, 401)
        refused = await client.post("/auth/login", json={"email": user.email, "password": PASSWORD})
        _retry_after(refused, 60)
        assert "address" in refused.json()["detail"]
    async with client_from(_address()) as elsewhere:
        response = await elsewhere.post(
            "/auth/login", json={"email": user.email, "password": PASSWORD}
        )
        assert response.status_code == 200, response.text


async def test_an_accounts_failures_lock_it_for_one_short_window_only(
    client_from: ClientFrom, session: AsyncSession
) -> None:
    user = await create_user(session)
    # The guesses come from two addresses: the account's own count stops them.
    for _ in range(2):
        async with client_from(_address()) as attacker:
            response = await attacker.post(
                "/auth/login", json={"email": user.email, "password": "guess"}
            )
            assert_problem(response, 401)
    async with client_from(_address()) as owner:
        right = {"email": user.email, "password": PASSWORD}
        refused = await owner.post("/auth/login", json=right)
        wait = _retry_after(refused, 2)
        assert "account" in refused.json()["detail"]
        await asyncio.sleep(wait + 0.2)
        response = await owner.post("/auth/login", json=right)
        assert response.status_code == 200, response.text


async def test_only_failures_count_for_an_account(
    client_from: ClientFrom, session: AsyncSession
) -> None:
    user = await create_user(session)
    async with client_from(_address()) as client:
        for _ in range(3):
            response = await client.post(
                "/auth/login", json={"email": user.email.upper(), "password": PASSWORD}
            )
            assert response.status_code == 200, response.text
        for _ in range(2):
            wrong = await client.post("/auth/login", json={"email": user.email, "password": "x"})
            assert_problem(wrong, 401)
        refused = await client.post("/auth/login", json={"email": user.email, "password": "x"})
        _retry_after(refused, 2)


async def test_an_unknown_email_is_throttled_like_a_known_one(client_from: ClientFrom) -> None:
    """A 429 must not tell which emails have accounts."""
    ghost = {"email": f"ghost-{uuid.uuid4().hex[:8]}@example.com", "password": "guess"}
    async with client_from(_address()) as client:
        for _ in range(2):
            assert_problem(await client.post("/auth/login", json=ghost), 401)
        _retry_after(await client.post("/auth/login", json=ghost), 2)
