"""Schema pieces every area shares: the ORM base model, pages, time zones, sizes and money."""

from __future__ import annotations

from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from typing import Annotated, Any, Generic, TypeVar, TypeVarTuple
from zoneinfo import available_timezones

from fastapi import Depends, Query
from pydantic import AfterValidator, BaseModel, ConfigDict, PlainSerializer, field_validator
from sqlalchemy import Select, func
from sqlalchemy.ext.asyncio import AsyncSession

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class Schema(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class RequestBody(BaseModel):
    """Request bodies refuse unknown fields: a typo is a 422, not a silently ignored value.

    Text never holds NUL characters: PostgreSQL cannot store them, and without this check the
    request would fail at the database, unable to say which field was wrong.
    """

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul_characters(cls, value: Any) -> Any:
        if _has_nul(value):
            raise ValueError("must not contain NUL (\\u0000) characters")
        return value


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return any(_has_nul(v) for v in value)
    return False


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class PageParams(BaseModel):
    limit: int
    offset: int


async def page_params(
    limit: Annotated[int, Query(ge=1, le=200, description="Page size (max 200).")] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="Rows to skip.")] = 0,
) -> PageParams:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a hop per request.
    return PageParams(limit=limit, offset=offset)


PageDep = Annotated[PageParams, Depends(page_params)]


async def fetch_page(
    session: AsyncSession, stmt: Select[*Ts], params: PageParams
) -> tuple[list[Any], int]:
    """Rows of one page and the total, in two queries whatever the page holds."""
    # Count over the same FROM and WHERE, without the page's extra columns (subqueries).
    count = stmt.with_only_columns(func.count(), maintain_column_froms=True).order_by(None)
    total = await session.scalar(count)
    rows = (await session.execute(stmt.limit(params.limit).offset(params.offset))).all()
    return list(rows), int(total or 0)


async def page_of(
    session: AsyncSession, stmt: Select[Any], params: PageParams, item: Callable[[Any], T]
) -> Page[T]:
    """A list endpoint's page: `item` turns each row's entity into its read schema."""
    rows, total = await fetch_page(session, stmt, params)
    return Page(
        items=[item(row[0]) for row in rows], total=total, limit=params.limit, offset=params.offset
    )


@lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())


def _check_zone(name: str) -> str:
    if name not in _zones():
        raise ValueError(f"'{name}' is not an IANA time zone name (e.g. 'Europe/Berlin')")
    return name


TimeZoneName = Annotated[str, AfterValidator(_check_zone)]

GIB = Decimal(1024**3)
HOURS_PER_MONTH = Decimal(730)


def backup_costs(size_bytes: int | None, price: Decimal | None) -> tuple[str | None, str | None]:
    """(monthly, hourly) cost as decimal strings, or (None, None) without a price."""
    if price is None or size_bytes is None:
        return None, None
    monthly = Decimal(size_bytes) / GIB * price
    hourly = monthly / HOURS_PER_MONTH
    return (
        str(monthly.quantize(Decimal("0.0001"), ROUND_HALF_UP)),
        str(hourly.quantize(Decimal("0.000001"), ROUND_HALF_UP)),
    )


def _decimal_text(value: Decimal) -> str:
    return format(value.normalize(), "f")


DecimalString = Annotated[
    Decimal, PlainSerializer(_decimal_text, return_type=str, when_used="json")
]
