"""Readiness (`/ready`): 200 when PostgreSQL and Redis answer, else 503 naming what does not.
Liveness (`/health`, no backend touched) is in app.main."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app.health.service import readiness
from app.problems import PROBLEM_MEDIA_TYPE, RETRY_AFTER_SECONDS, problem_response

router = APIRouter(tags=["health"])


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: dict[str, str]  # part -> "ok"


_NOT_READY = {
    "description": "PostgreSQL or Redis cannot be reached: `detail` names which; `checks` has "
    'each part ("ok" or why not)',
    "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}},
    "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
}


@router.get(
    "/ready",
    name="ready",
    response_model=Readiness,
    summary="Readiness: PostgreSQL and Redis answer (no authentication)",
    responses={503: _NOT_READY},
)
async def ready(request: Request) -> Readiness | JSONResponse:
    probes = await readiness(request.app.state.sessionmaker, request.app.state.arq)
    checks = {p.part: "ok" if p.error is None else f"unreachable: {p.error}" for p in probes}
    failing = [p for p in probes if p.error is not None]
    if not failing:
        return Readiness(status="ready", checks=checks)
    return problem_response(
        503,
        "Not ready",
        "; ".join(f"{p.name} is unreachable ({p.error})" for p in failing),
        {"Retry-After": str(RETRY_AFTER_SECONDS)},
        checks=checks,
    )
