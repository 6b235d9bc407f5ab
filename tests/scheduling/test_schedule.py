"""Schedule validation, weekday names and summaries."""

from datetime import date

import pytest

from app.scheduling import (
    WEEKDAYS,
    Schedule,
    format_hour,
    is_full_day,
    local_weekday,
    schedule_summary,
)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (Schedule("daily", 2), "Daily at 2:00 AM"),
        (Schedule("weekly", 3, "monday"), "Weekly on Monday at 3:00 AM"),
        (Schedule("daily", 0), "Daily at 12:00 AM"),
        (Schedule("daily", 12), "Daily at 12:00 PM"),
        (Schedule("daily", 13), "Daily at 1:00 PM"),
        (Schedule("daily", 23), "Daily at 11:00 PM"),
        (Schedule("daily", 11), "Daily at 11:00 AM"),
        (Schedule("weekly", 0, "sunday"), "Weekly on Sunday at 12:00 AM"),
        (Schedule("weekly", 18, "saturday"), "Weekly on Saturday at 6:00 PM"),
    ],
)
def test_schedule_summary(schedule: Schedule, expected: str) -> None:
    assert schedule_summary(schedule) == expected


def test_format_hour_covers_every_hour_once() -> None:
    labels = [format_hour(h) for h in range(24)]
    assert len(set(labels)) == 24
    assert labels[0] == "12:00 AM"
    assert labels[1] == "1:00 AM"
    assert labels[12] == "12:00 PM"
    assert labels[23] == "11:00 PM"
    with pytest.raises(ValueError):
        format_hour(24)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"frequency": "weekly", "hour": 2}, "day_of_week"),
        ({"frequency": "daily", "hour": 2, "day_of_week": "monday"}, "no day_of_week"),
        ({"frequency": "daily", "hour": 24}, "hour"),
        ({"frequency": "daily", "hour": -1}, "hour"),
        ({"frequency": "daily", "hour": True}, "hour"),
        ({"frequency": "daily", "hour": 2.0}, "hour"),
        ({"frequency": "monthly", "hour": 2}, "frequency"),
        ({"frequency": "weekly", "hour": 2, "day_of_week": "Monday"}, "day_of_week"),
    ],
)
def test_schedule_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)  # type: ignore[arg-type]


def test_schedule_is_frozen() -> None:
    s = Schedule("daily", 2)
    with pytest.raises(AttributeError):
        s.hour = 3  # type: ignore[misc]


def test_local_weekday_known_dates() -> None:
    assert local_weekday(date(2026, 3, 8)) == "sunday"
    assert local_weekday(date(2026, 3, 9)) == "monday"
    assert local_weekday(date(2026, 3, 14)) == "saturday"
    assert local_weekday(date(2000, 1, 1)) == "saturday"
    # A whole week maps onto every name once, in UI order starting on a Sunday.
    assert [local_weekday(date(2026, 3, 8 + i)) for i in range(7)] == list(WEEKDAYS)


def test_is_full_day() -> None:
    weekly = Schedule("weekly", 3, "monday")
    assert is_full_day(weekly, date(2026, 3, 9))
    assert not is_full_day(weekly, date(2026, 3, 8))
    assert not is_full_day(weekly, date(2026, 3, 10))
    daily = Schedule("daily", 3)
    assert all(is_full_day(daily, date(2026, 3, d)) for d in range(1, 32))
