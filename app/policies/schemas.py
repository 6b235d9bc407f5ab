from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from app.schemas import DecimalString, Name, RequestBody, Schema
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
    schedule_description: str = Field(
        description="What each day takes, in the owner's zone, then what the coming year's "
        "clock changes do to a day that takes a backup.",
        examples=[
            "Full every Monday at 3:00 AM; incrementals on the other days, up to 6 per chain"
        ],
    )
    timezone: str = Field(description="The owner's IANA time zone; the hour is local to it.")
    max_incremental_chain: int
    retention_count: int
    backup_device: BackupDevice
    instance_count: int
    at_risk_count: int = Field(
        description="Attached instances whose last good backup is older than expected."
    )
    unprotected_count: int = Field(description="Attached instances without any good backup.")
    expected_backup_interval_hours: float = Field(
        description="How old an instance's last good backup may be before it is at risk: the "
        "longest gap between two runs that take a backup (24 h daily, 168 h weekly full-only) "
        "plus IBP_RPO_GRACE_HOURS."
    )
    last_error: str | None = Field(
        description="The most recent backup failure. Current while status is 'error'; once "
        "resolved (last_error_resolved_at set) it is history."
    )
    last_error_at: datetime | None
    last_error_resolved_at: datetime | None = Field(
        description="When the policy left Error: the most recent backup of every attached "
        "instance, scheduled or Backup now, had completed. Null while the error is current."
    )
    next_run_at: datetime | None = Field(
        description="The next run that takes a backup (UTC): a weekly policy's days without a "
        "backup (full-only, or the chain is full) are skipped; an instance without a usable "
        "full makes the next day's run take one."
    )
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


class EstimateRequest(PolicySettings):
    instance_ids: list[uuid.UUID] = Field(
        min_length=1, max_length=200, description="Your instances to attach (admins: any)."
    )

    @field_validator("instance_ids")
    @classmethod
    def _unique(cls, ids: list[uuid.UUID]) -> list[uuid.UUID]:
        if len(set(ids)) != len(ids):
            raise ValueError("instance ids must be unique")
        return ids


class InstanceEstimate(BaseModel):
    instance_id: uuid.UUID
    name: str
    location_id: uuid.UUID
    full_bytes: int = Field(description="One full backup of the chosen disks.")
    full_basis: Literal["measured", "allocated"] = Field(
        description="'measured': the instance's latest completed full of these disks; "
        "'allocated': the disks' allocated size (no such full yet)."
    )
    incremental_bytes: int = Field(description="One incremental (a run's changes).")
    incremental_basis: Literal["measured", "assumed"] = Field(
        description="'measured': the median of its latest completed incrementals of these "
        "disks; 'assumed': a share of the allocated size (no such incremental yet)."
    )
    measured_incrementals: int = Field(description="How many incrementals were measured.")
    stored_bytes: int = Field(description="chains x (full + incrementals x incremental).")


class LocationEstimate(BaseModel):
    location_id: uuid.UUID
    name: str
    price_per_gb_month: DecimalString | None = Field(
        description="Credits per GB-month (decimal string); null: no pricing."
    )
    stored_bytes: int
    monthly_cost: str | None = Field(description="Decimal string; null without a price.")


class PolicyEstimate(BaseModel):
    """The steady state of a policy's backups: what they store and cost once retention runs."""

    stored_bytes: int = Field(description="Every instance's steady-state bytes.")
    monthly_cost: str | None = Field(
        description="Sum over the locations (decimal string); null when one has no price."
    )
    chains: int = Field(description="Chains kept per instance (retention_count).")
    incrementals_per_chain: int = Field(
        description="Incrementals in a complete chain under this schedule."
    )
    instances: list[InstanceEstimate]
    locations: list[LocationEstimate]
    assumptions: list[str] = Field(description="How the figures were computed, in words.")


class PolicyDetail(PolicyRead):
    """A policy read alone: with the estimate of its attached instances and what it stores."""

    estimate: PolicyEstimate = Field(description="The estimate for the policy as it stands.")
    stored_bytes: int = Field(
        description="What its attached instances' completed backups under it store today."
    )
