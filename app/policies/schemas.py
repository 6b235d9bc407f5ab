from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from app.schemas import Name, RequestBody, Schema
from app.values import BackupDevice, BackupType, Frequency, PolicyStatus, Weekday


# In requests and in reads: a RequestBody, so that its hour is a strict integer.
class PolicySchedule(RequestBody):
    model_config = ConfigDict(from_attributes=True)

    frequency: Frequency
    hour: int = Field(ge=0, le=23, description="Hour of day in the owner's time zone (0-23).")
    day_of_week: Weekday | None = Field(
        default=None, description="Required for weekly schedules; must be absent for daily."
    )

    @model_validator(mode="after")
    def _weekday_matches_frequency(self) -> PolicySchedule:
        if self.frequency == Frequency.WEEKLY and self.day_of_week is None:
            raise ValueError("day_of_week is required for a weekly schedule")
        if self.frequency == Frequency.DAILY and self.day_of_week is not None:
            raise ValueError("day_of_week must be null for a daily schedule")
        return self


# Strict here too: RequestBody makes plain `int` fields strict, not an Annotated one in a union.
MaxIncrementalChain = Annotated[int, Field(ge=0, le=30), Strict()]
RetentionCount = Annotated[int, Field(ge=1, le=365), Strict()]


class PolicySettings(RequestBody):
    """What a policy does, with its defaults: in a new policy and in a cost estimate."""

    schedule: PolicySchedule
    max_incremental_chain: MaxIncrementalChain = 6
    retention_count: RetentionCount = 3
    backup_device: BackupDevice = BackupDevice.PRIMARY


class PolicyCreate(PolicySettings):
    name: Name
    owner_id: uuid.UUID | None = Field(
        default=None, description="Admins may create a policy for any user; default: you."
    )


class PolicyUpdate(RequestBody):
    name: Name | None = None
    schedule: PolicySchedule | None = None
    max_incremental_chain: MaxIncrementalChain | None = None
    retention_count: RetentionCount | None = None
    backup_device: BackupDevice | None = None
    status: Literal[PolicyStatus.ACTIVE, PolicyStatus.PAUSED] | None = Field(
        default=None, description="Pause or resume. 'error' is set by the system only."
    )


class PolicyRead(Schema):
    id: uuid.UUID
    owner_id: uuid.UUID
    name: str
    status: PolicyStatus
    schedule: PolicySchedule
    schedule_summary: str = Field(examples=["Daily at 2:00 AM"])
    timezone: str = Field(description="The owner's IANA time zone; the hour is local to it.")
    max_incremental_chain: int
    retention_count: int
    backup_device: BackupDevice
    instance_count: int
    last_error: str | None
    last_error_at: datetime | None
    next_run_at: datetime | None = Field(description="Next scheduled run (UTC).")
    skipped_runs: int = Field(description="Runs the scheduler skipped (overlap, downtime, ...).")
    last_skip_reason: str | None
    created_at: datetime
    updated_at: datetime


class AttachRequest(RequestBody):
    instance_id: uuid.UUID


class SchedulePreviewRun(BaseModel):
    at: datetime = Field(description="UTC instant of the run.")
    local_time: datetime = Field(description="The same instant in the owner's zone, with offset.")
    type: BackupType
