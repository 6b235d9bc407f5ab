"""Schema pieces every area shares: the ORM base model, request bodies, names, pages, time zones,
sizes and money."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from types import NoneType, UnionType
from typing import Annotated, Any, Generic, TypeVar, TypeVarTuple, Union, get_args, get_origin
from zoneinfo import available_timezones

from fastapi import Depends, Query
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    Strict,
    field_validator,
)
from sqlalchemy import Select, func
from sqlalchemy.ext.asyncio import AsyncSession

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class Schema(BaseModel):
    model_config = ConfigDict(from_attributes=True)


_NUL_REFUSED = "must not contain NUL (\\u0000) characters"


class RequestBody(BaseModel):
    """Request bodies refuse unknown fields: a typo is a 422, not a silently ignored value.

    Text never holds NUL characters: PostgreSQL cannot store them, and without this check the
    request would fail at the database, unable to say which field was wrong.

    Integer and boolean fields are strict: pydantic would otherwise take `"hour": true` as 1,
    `"3"` as 3 and `1` as true, hiding a client's mistake behind a value it did not mean. Every
    subclass gets this when it is defined, so a new field cannot forget it.
    """

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        loose = [
            field
            for field in cls.model_fields.values()
            if _int_or_bool(field.annotation)
            and not any(isinstance(m, Strict) for m in field.metadata)
        ]
        for field in loose:
            field.metadata.append(Strict())
        if loose:
            cls.model_rebuild(force=True)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul_characters(cls, value: Any) -> Any:
        if _has_nul(value):
            raise ValueError(_NUL_REFUSED)
        return value


def _int_or_bool(annotation: Any) -> bool:
    """`int`, `bool`, or either of them or None (`int | None`)."""
    if annotation in (int, bool):
        return True
    if get_origin(annotation) in (Union, UnionType):
        members = set(get_args(annotation)) - {NoneType}
        return bool(members) and members <= {int, bool}
    return False


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return any(_has_nul(v) for v in value)
    return False


# Characters no name may hold besides control characters (Unicode category Cc) and line or
# paragraph separators: the bidirectional controls, which make a name display as other text
# ("report\u202efdp.exe" shows as "reportexe.pdf") or reorder the text around it in a list.
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def _readable_name(value: str) -> str:
    if value and not value.strip():
        raise ValueError("must not be only spaces")
    if "\x00" in value:
        raise ValueError(_NUL_REFUSED)  # in the words every other text field uses
    for char in value:
        if char in _BIDI_CONTROLS or unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            raise ValueError(
                f"must not contain control or bidirectional formatting characters "
                f"(U+{ord(char):04X})"
            )
    return value


Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_readable_name)]
"""A name people read in lists and logs (policy, storage, hypervisor, location, instance, API
token): not blank, no control or bidirectional formatting characters."""

UserName = Annotated[str, Field(max_length=200), AfterValidator(_readable_name)]
"""A person's name: the same rule as Name, but it may be empty (the user has none)."""


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


def monthly_cost(size_bytes: int, price: Decimal) -> Decimal:
    """What `size_bytes` kept for a month costs at `price` per GB-month (a GB is 2^30 bytes)."""
    return Decimal(size_bytes) / GIB * price


def monthly_text(monthly: Decimal) -> str:
    """A monthly cost as the API shows it: a decimal string to 4 places."""
    return str(monthly.quantize(Decimal("0.0001"), ROUND_HALF_UP))


def backup_costs(size_bytes: int | None, price: Decimal | None) -> tuple[str | None, str | None]:
    """(monthly, hourly) cost as decimal strings, or (None, None) without a price."""
    if price is None or size_bytes is None:
        return None, None
    monthly = monthly_cost(size_bytes, price)
    hourly = monthly / HOURS_PER_MONTH
    return monthly_text(monthly), str(hourly.quantize(Decimal("0.000001"), ROUND_HALF_UP))


def _decimal_text(value: Decimal) -> str:
    return format(value.normalize(), "f")


DecimalString = Annotated[
    Decimal, PlainSerializer(_decimal_text, return_type=str, when_used="json")
]
