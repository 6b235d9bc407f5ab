"""A success response is sent only after the request's transaction committed."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import uvicorn
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.config import Settings
from app.main import create_app
from tests.factories import auth_headers, create_user


class SlowCommitSession(AsyncSession):
    events: list[str]

    async def commit(self) -> None:
        await asyncio.sleep(0.2)  # a commit that takes a while (a busy database)
        await super().commit()
        self.events.append("commit")


async def test_created_response_arrives_after_the_commit(
    committed_engine: AsyncEngine, settings: Settings, arq_redis: Any
) -> None:
    events: list[str] = []
    SlowCommitSession.events = events
    maker = async_sessionmaker(committed_engine, class_=SlowCommitSession, expire_on_commit=False)
    async with maker() as session:
        user = await create_user(session)
        headers = await auth_headers(session, user)
        await session.commit()
    events.clear()
    app = create_app(settings)
    app.state.sessionmaker, app.state.arq = maker, arq_redis
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/api/v1") as client:
            body = {"name": "p", "schedule": {"frequency": "daily", "hour": 2}}
            response = await client.post("/backup-policies", json=body, headers=headers)
            events.append("response")
        assert response.status_code == 201, response.text
        assert events == ["commit", "response"]
    finally:
        server.should_exit = True
        await serving
