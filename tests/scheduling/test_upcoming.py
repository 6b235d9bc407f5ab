"""The next run that takes a backup (next_run_at as shown) and the longest wait between two."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.scheduling import (
    WEEKDAYS,
    ChainState,
    Schedule,
    local_weekday,
    longest_gap_days,
    next_backup_at,
    next_run_at,
)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


MONDAY_1AM = Schedule("weekly", 1, "monday")


def test_weekly_full_only_on_monday_after_its_run_shows_next_monday_not_tomorrow() -> None:
    # 2026-06-01 is a Monday; 1:00 AM in Paris (summer) is 23:00 UTC the day before.
    after_run = utc(2026, 5, 31, 23, 1)
    assert next_run_at(MONDAY_1AM, "Europe/Paris", after_run) == utc(2026, 6, 1, 23)  # daily
    assert next_backup_at(MONDAY_1AM, 0, "Europe/Paris", after_run) == utc(2026, 6, 7, 23)


def test_weekly_full_only_before_its_run_on_monday_is_that_run() -> None:
    assert next_backup_at(MONDAY_1AM, 0, "Europe/Paris", utc(2026, 5, 31, 22)) == utc(
        2026, 5, 31, 23
    )


@pytest.mark.parametrize(
    ("zone", "schedule", "after", "expected"),
    [
        # Berlin springs forward on Sunday 2026-03-29: 2:00 AM does not exist, the run is at
        # 3:00 CEST (01:00 UTC); the week before, 2:00 CET is 01:00 UTC too.
        (
            "Europe/Berlin",
            Schedule("weekly", 2, "sunday"),
            utc(2026, 3, 22, 2),
            utc(2026, 3, 29, 1),
        ),
        # The Sunday after: 2:00 CEST = 00:00 UTC.
        ("Europe/Berlin", Schedule("weekly", 2, "sunday"), utc(2026, 3, 29, 1), utc(2026, 4, 5)),
        # New York falls back on Sunday 2026-11-01: 1:00 AM happens twice, the first (EDT).
        (
            "America/New_York",
            Schedule("weekly", 1, "sunday"),
            utc(2026, 10, 26),
            utc(2026, 11, 1, 5),
        ),
        # ... and the next Sunday is 1:00 EST, 06:00 UTC, a week and an hour later.
        (
            "America/New_York",
            Schedule("weekly", 1, "sunday"),
            utc(2026, 11, 1, 5),
            utc(2026, 11, 8, 6),
        ),
        # Kolkata (+05:30, no DST): Monday 3:00 AM is Sunday 21:30 UTC.
        ("Asia/Kolkata", Schedule("weekly", 3, "monday"), utc(2026, 6, 2), utc(2026, 6, 7, 21, 30)),
        # Sydney (southern summer time ends 2026-04-05 at 3:00 -> 2:00): Saturday 11 PM.
        (
            "Australia/Sydney",
            Schedule("weekly", 23, "saturday"),
            utc(2026, 4, 1),
            utc(2026, 4, 4, 12),
        ),
        (
            "Australia/Sydney",
            Schedule("weekly", 23, "saturday"),
            utc(2026, 4, 4, 12),
            utc(2026, 4, 11, 13),
        ),
    ],
)
def test_weekly_full_only_across_clock_changes_and_zones(
    zone: str, schedule: Schedule, after: datetime, expected: datetime
) -> None:
    assert next_backup_at(schedule, 0, zone, after) == expected


def test_weekly_with_a_short_chain_skips_the_days_after_the_chain_fills() -> None:
    tuesday = Schedule("weekly", 2, "tuesday")
    # Steady state: Tuesday full, Wednesday and Thursday incrementals, then nothing until Tuesday.
    assert next_backup_at(tuesday, 2, "UTC", utc(2026, 6, 2, 3)) == utc(2026, 6, 3, 2)  # Wed
    assert next_backup_at(tuesday, 2, "UTC", utc(2026, 6, 4, 3)) == utc(2026, 6, 9, 2)  # Thu->Tue
    # An instance whose chain has room takes an incremental tomorrow; a full one waits.
    assert next_backup_at(tuesday, 2, "UTC", utc(2026, 6, 4, 3), [ChainState(1, True)]) == utc(
        2026, 6, 5, 2
    )
    assert next_backup_at(tuesday, 2, "UTC", utc(2026, 6, 4, 3), [ChainState(2, True)]) == utc(
        2026, 6, 9, 2
    )


def test_an_instance_without_a_usable_full_takes_one_on_the_next_run_whatever_the_day() -> None:
    after = utc(2026, 6, 2, 3)  # a Tuesday
    assert next_backup_at(MONDAY_1AM, 0, "UTC", after, [ChainState(0, True)]) == utc(2026, 6, 8, 1)
    assert next_backup_at(MONDAY_1AM, 0, "UTC", after, [None]) == utc(2026, 6, 3, 1)
    broken = ChainState(0, False, "previous full backup failed")
    assert next_backup_at(MONDAY_1AM, 0, "UTC", after, [ChainState(0, True), broken]) == utc(
        2026, 6, 3, 1
    )


def test_daily_policies_take_a_backup_on_every_run() -> None:
    daily = Schedule("daily", 2)
    after = utc(2026, 3, 7, 12)
    expected = next_run_at(daily, "America/New_York", after)
    assert next_backup_at(daily, 0, "America/New_York", after) == expected == utc(2026, 3, 8, 7)


@pytest.mark.parametrize(
    ("schedule", "chain", "days"),
    [
        (Schedule("daily", 2), 0, 1),
        (Schedule("daily", 2), 6, 1),
        (Schedule("weekly", 2, "monday"), 0, 7),
        (Schedule("weekly", 2, "monday"), 2, 5),
        (Schedule("weekly", 2, "monday"), 6, 1),
        (Schedule("weekly", 2, "monday"), 30, 1),
    ],
)
def test_longest_gap_between_runs_that_take_a_backup(
    schedule: Schedule, chain: int, days: int
) -> None:
    assert longest_gap_days(schedule, chain) == days


ZONES = ["America/New_York", "Europe/London", "Australia/Lord_Howe", "Asia/Kathmandu", "UTC"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    zone=st.sampled_from(ZONES),
    hour=st.integers(0, 23),
    day=st.sampled_from(WEEKDAYS),
    chain=st.integers(0, 8),
    after=st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2028, 12, 31)),
)
def test_steady_state_backups_are_runs_that_plan_a_backup_and_none_is_passed_over(
    zone: str, hour: int, day: str, chain: int, after: datetime
) -> None:
    schedule = Schedule("weekly", hour, day)  # type: ignore[arg-type]
    start = after.replace(tzinfo=UTC)
    got = next_backup_at(schedule, chain, zone, start)
    assert got > start
    # Every run between is a day without a backup in steady state (not the full day nor one
    # of the `chain` days after it), and the one found is such a day.
    taking = {WEEKDAYS[(WEEKDAYS.index(day) + i) % 7] for i in range(min(chain, 6) + 1)}  # type: ignore[arg-type]
    cursor = next_run_at(schedule, zone, start)
    while cursor < got:
        assert local_weekday(cursor.astimezone(ZoneInfo(zone)).date()) not in taking
        cursor = next_run_at(schedule, zone, cursor)
    assert cursor == got
    assert local_weekday(got.astimezone(ZoneInfo(zone)).date()) in taking
    assert got - start <= timedelta(days=8)
