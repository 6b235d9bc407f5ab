from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated

from pydantic import Field

from app.schemas import DecimalString, Name, RequestBody, Schema

Price = Annotated[DecimalString, Field(ge=0, max_digits=14, decimal_places=6)]


class LocationRead(Schema):
    id: uuid.UUID
    name: str
    backup_price_per_gb_month: DecimalString | None = Field(
        description="Credits per GB-month of backup storage (decimal string), or null: no pricing."
    )
    created_at: datetime
    updated_at: datetime


class LocationCreate(RequestBody):
    name: Name
    backup_price_per_gb_month: Price | None = None


class LocationUpdate(RequestBody):
    name: Name | None = None
    backup_price_per_gb_month: Price | None = Field(
        default=None, description="Send null to remove pricing."
    )


__all__ = ["Decimal", "LocationCreate", "LocationRead", "LocationUpdate"]
