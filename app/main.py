"""The FastAPI application: lifespan resources, routers under /api/v1, problem responses."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from arq.connections import ArqRedis
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

from app.auth.router import auth_router, tokens_router
from app.backups.router import router as backups_router
from app.body_limit import BodySizeLimit
from app.config import Settings, get_settings
from app.db import build_engine, build_sessionmaker, database_unreachable
from app.health.router import router as health_router
from app.hypervisors.router import router as hypervisors_router
from app.instances.router import router as instances_router
from app.locations.router import router as locations_router
from app.metrics import CatalogSnapshot, read_catalog, render
from app.policies.router import router as policies_router
from app.problems import PROBLEM_MEDIA_TYPE, install_error_handlers
from app.restores.router import router as restores_router
from app.storages.router import router as storages_router
from app.users.router import me_router, users_router
from app.webhooks.router import router as webhooks_router

API_PREFIX = "/api/v1"
REDIS_CONNECT_TIMEOUT_S = 2


def _operation_id(route: APIRoute) -> str:
    tag = str(route.tags[0]) if route.tags else "default"
    return f"{tag.replace('-', '_')}_{route.name}"


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    owned_engine = None
    if getattr(app.state, "sessionmaker", None) is None:
        owned_engine = build_engine(settings, pre_ping=False)
        app.state.sessionmaker = build_sessionmaker(owned_engine)
    owned_arq = None
    if getattr(app.state, "arq", None) is None:
        # Connected on first use, not here: an API started while Redis is down serves, says
        # so at /ready and answers 503 where it needs the queue, then recovers by itself.
        owned_arq = ArqRedis.from_url(
            settings.redis_url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S
        )
        app.state.arq = owned_arq
    try:
        yield
    finally:
        if owned_arq is not None:
            await owned_arq.aclose()
        if owned_engine is not None:
            await owned_engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # Swagger UI and ReDoc from files installed with fastapi-offline, not a CDN: the docs
    # render where the servers have no internet.
    app = FastAPIOffline(
        title="Instance Backup Policies",
        version="1.0.0",
        summary="Automated full and incremental backups of VMs, on a schedule you set once.",
        lifespan=_lifespan,
        generate_unique_id_function=_operation_id,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=f"{API_PREFIX}/redoc",
        swagger_ui_oauth2_redirect_url=f"{API_PREFIX}/docs/oauth2-redirect",
        static_url=f"{API_PREFIX}/docs/static",
    )
    app.state.settings = settings
    app.state.sessionmaker = None
    app.state.arq = None
    install_error_handlers(app)
    # Added before CORS, so CORS wraps it: a browser can read its 413 too.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type"],
        )
    # Each router straight into the app: FastAPI matches a request against every level of
    # nesting more than once, so one level less is a cheaper request for every endpoint.
    for router in (
        auth_router,
        tokens_router,
        me_router,
        users_router,
        locations_router,
        storages_router,
        hypervisors_router,
        instances_router,
        policies_router,
        backups_router,
        restores_router,
        webhooks_router,
        health_router,
    ):
        app.include_router(router, prefix=API_PREFIX)

    @app.get(
        f"{API_PREFIX}/health", tags=["health"], name="get", summary="Liveness (no database access)"
    )
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        """Prometheus text format: this process's metrics and the catalog's gauges."""
        token = settings.metrics_token
        if token:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), token.encode()):
                return Response(
                    "A bearer token (IBP_METRICS_TOKEN) is needed\n",
                    status_code=401,
                    media_type="text/plain",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        try:
            async with request.app.state.sessionmaker() as session:
                snap = await read_catalog(session, datetime.now(UTC))
        except Exception as exc:
            if not database_unreachable(exc):
                raise
            snap = CatalogSnapshot(up=False)  # the process's own metrics still go out
        return Response(render(snap), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    _document_problems(app)
    return app


_UNAVAILABLE_RESPONSE = {
    "description": "The database or the job queue cannot be reached; retry after `Retry-After` s",
    "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}},
    "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
}

_TOO_LARGE_RESPONSE = {
    "description": "The request body is larger than the API accepts (IBP_MAX_BODY_BYTES)",
    "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
}


def _document_problems(app: FastAPI) -> None:
    """Error responses are documented as application/problem+json only: that is what is sent.

    (`responses={..., "model": Problem}` makes FastAPI add an application/json twin.) Every
    operation that reaches the database (all but /health) may also answer 503, and every one
    that takes a body 413.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema["paths"].values():
                for operation in operations.values():
                    for response in operation.get("responses", {}).values():
                        content = response.get("content", {})
                        if PROBLEM_MEDIA_TYPE in content:
                            content.pop("application/json", None)
                    if "401" in operation.get("responses", {}):
                        operation["responses"]["503"] = _UNAVAILABLE_RESPONSE
                    if "requestBody" in operation:
                        operation["responses"]["413"] = _TOO_LARGE_RESPONSE
        return app.openapi_schema or generate()

    app.openapi = openapi  # type: ignore[method-assign]
