"""The app as served: its lifespan opens the engine, and a token revoked elsewhere is refused at
once (each request reads the token from the database)."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from app.config import Settings
from app.main import create_app
from app.models import ApiToken
from tests.factories import auth_headers, create_admin, create_policy, create_user


async def test_policy_list_through_the_lifespan_engine(
    committed_engine: AsyncEngine, settings: Settings
) -> None:
    maker = async_sessionmaker(committed_engine, expire_on_commit=False)
    async with maker() as session:
        owner, other = await create_user(session), await create_user(session)
        admin = await create_admin(session)
        mine = [await create_policy(session, owner) for _ in range(3)]
        await create_policy(session, other)
        headers, admin_headers = (
            await auth_headers(session, owner),
            await auth_headers(session, admin),
        )
        await session.commit()
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test/api/v1") as client,
    ):
        page = (await client.get("/backup-policies", headers=headers)).json()
        assert page["total"] == 3
        assert {p["id"] for p in page["items"]} == {str(p.id) for p in mine}
        everyone = (await client.get("/backup-policies?limit=2", headers=admin_headers)).json()
        assert everyone["total"] == 4 and len(everyone["items"]) == 2
        # The token's use was recorded, and its revocation by another connection is seen by
        # the very next request.
        async with maker() as session:
            token = await session.scalar(
                select(ApiToken).where(ApiToken.user_id == owner.id, ApiToken.kind == "personal")
            )
            assert token is not None and token.last_used_at is not None
            await session.execute(
                update(ApiToken).where(ApiToken.id == token.id).values(revoked_at=datetime.now(UTC))
            )
            await session.commit()
        refused = await client.get("/backup-policies", headers=headers)
        assert refused.status_code == 401
        assert refused.json()["detail"] == "Token has been revoked"
