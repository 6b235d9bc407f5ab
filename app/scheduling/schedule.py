"""Schedule value type, weekday helpers and the human-readable summary.

Pure code: no I/O, no clock reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from app.values import Frequency, Weekday

FREQUENCIES: tuple[Frequency, ...] = tuple(Frequency)
#: Weekdays in the order the UI lists them (Sunday first).
WEEKDAYS: tuple[Weekday, ...] = tuple(Weekday)


@dataclass(frozen=True)
class Schedule:
    """When a policy runs.

    ``hour`` is the owner's *local* hour (0-23) in the owner's IANA zone, never a UTC hour.
    Every policy runs once per local day at ``hour``:00; for a weekly policy ``day_of_week``
    is the local weekday of the full backup (incrementals run on the other days).
    ``day_of_week`` is required for weekly schedules and must be ``None`` for daily ones.
    """

    frequency: Frequency
    hour: int
    day_of_week: Weekday | None = None

    def __post_init__(self) -> None:
        if self.frequency not in FREQUENCIES:
            raise ValueError(f"frequency must be one of {', '.join(FREQUENCIES)}")
        if isinstance(self.hour, bool) or not isinstance(self.hour, int):
            raise ValueError("hour must be an integer from 0 to 23")
        if not 0 <= self.hour <= 23:
            raise ValueError("hour must be an integer from 0 to 23")
        if self.frequency == Frequency.WEEKLY:
            if self.day_of_week is None:
                raise ValueError("a weekly schedule needs a day_of_week")
            if self.day_of_week not in WEEKDAYS:
                raise ValueError(f"day_of_week must be one of {', '.join(WEEKDAYS)}")
        elif self.day_of_week is not None:
            raise ValueError("a daily schedule has no day_of_week")


def local_weekday(d: date) -> Weekday:
    """The weekday name of a (local) calendar date."""
    # isoweekday(): Monday=1 .. Sunday=7, so % 7 gives Sunday=0 .. Saturday=6.
    return WEEKDAYS[d.isoweekday() % 7]


def is_full_day(schedule: Schedule, local_date: date) -> bool:
    """Whether ``local_date`` (the owner's local date of a run) is a scheduled full day.

    Weekly: True exactly when the local weekday is the policy's ``day_of_week``.
    Daily: always True -- every day *may* start a full; whether a given run is a full or an
    incremental depends on the current chain, which :func:`plan_backup` decides.
    """
    if schedule.frequency == Frequency.WEEKLY:
        return local_weekday(local_date) == schedule.day_of_week
    return True


def format_hour(hour: int) -> str:
    """12-hour clock label of a whole hour: 0 -> "12:00 AM", 12 -> "12:00 PM", 13 -> "1:00 PM"."""
    if not 0 <= hour <= 23:
        raise ValueError("hour must be an integer from 0 to 23")
    suffix = "AM" if hour < 12 else "PM"
    twelve = hour % 12 or 12
    return f"{twelve}:00 {suffix}"


def schedule_summary(schedule: Schedule) -> str:
    """ "Daily at 2:00 AM" / "Weekly on Monday at 3:00 AM"."""
    at = format_hour(schedule.hour)
    if schedule.frequency == Frequency.WEEKLY:
        assert schedule.day_of_week is not None  # guaranteed by Schedule.__post_init__
        return f"Weekly on {schedule.day_of_week.capitalize()} at {at}"
    return f"Daily at {at}"
