"""Example tests for run instants: exact DST cases, checked against known UTC instants."""

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from app.scheduling import (
    Schedule,
    missed_slot_action,
    next_run_at,
    resolve_zone,
    run_on_local_date,
    slot_local_date,
)
from tests.scheduling.runs import upcoming_runs


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def daily(hour: int) -> Schedule:
    return Schedule("daily", hour)


@pytest.mark.parametrize(
    ("zone", "hour", "after", "expected"),
    [
        # New York spring forward 2026-03-08: 02:00 does not exist -> 03:00 EDT.
        ("America/New_York", 2, utc(2026, 3, 7, 12), utc(2026, 3, 8, 7)),
        ("America/New_York", 1, utc(2026, 3, 7, 12), utc(2026, 3, 8, 6)),  # 01:00 EST
        ("America/New_York", 3, utc(2026, 3, 7, 12), utc(2026, 3, 8, 7)),  # 03:00 EDT
        ("America/New_York", 2, utc(2026, 3, 8, 7), utc(2026, 3, 9, 6)),  # next day, EDT
        # New York fall back 2026-11-01: 01:00 happens twice -> first occurrence (EDT).
        ("America/New_York", 1, utc(2026, 10, 31, 12), utc(2026, 11, 1, 5)),
        ("America/New_York", 1, utc(2026, 11, 1, 5), utc(2026, 11, 2, 6)),  # not 11-01 06:00
        ("America/New_York", 2, utc(2026, 10, 31, 12), utc(2026, 11, 1, 7)),  # 02:00 EST
        # Europe/London 2026: 01:00 GMT -> 02:00 BST on 03-29; 02:00 BST -> 01:00 on 10-25.
        ("Europe/London", 1, utc(2026, 3, 28, 12), utc(2026, 3, 29, 1)),  # 02:00 BST
        ("Europe/London", 1, utc(2026, 3, 29, 1), utc(2026, 3, 30, 0)),
        ("Europe/London", 1, utc(2026, 10, 24, 12), utc(2026, 10, 25, 0)),  # 01:00 BST
        ("Europe/London", 1, utc(2026, 10, 25, 0), utc(2026, 10, 26, 1)),  # 01:00 GMT
        ("Europe/London", 2, utc(2026, 6, 1, 12), utc(2026, 6, 2, 1)),  # summer, BST
        ("Europe/London", 2, utc(2026, 12, 1, 12), utc(2026, 12, 2, 2)),  # winter, GMT
        # Lord Howe: 30-minute DST. 2026-10-04 02:00 +10:30 -> 02:30 +11.
        ("Australia/Lord_Howe", 2, utc(2026, 10, 3, 0), utc(2026, 10, 3, 15, 30)),
        ("Australia/Lord_Howe", 2, utc(2026, 10, 3, 15, 30), utc(2026, 10, 4, 15)),
        # 2026-04-05 02:00 +11 -> 01:30 +10:30: 01:00 runs at its first occurrence (+11).
        ("Australia/Lord_Howe", 1, utc(2026, 4, 3, 12), utc(2026, 4, 3, 14)),
        ("Australia/Lord_Howe", 1, utc(2026, 4, 3, 14), utc(2026, 4, 4, 14)),
        ("Australia/Lord_Howe", 1, utc(2026, 4, 4, 14), utc(2026, 4, 5, 14, 30)),
        # Fixed odd offsets.
        ("Asia/Kolkata", 2, utc(2026, 1, 1), utc(2026, 1, 1, 20, 30)),
        ("Asia/Kathmandu", 0, utc(2026, 1, 1), utc(2026, 1, 1, 18, 15)),
        # Chatham: +13:45 in (southern) summer, +12:45 in winter; gap 02:45 -> 03:45.
        ("Pacific/Chatham", 3, utc(2026, 1, 14), utc(2026, 1, 14, 13, 15)),
        ("Pacific/Chatham", 3, utc(2026, 7, 1), utc(2026, 7, 1, 14, 15)),
        ("Pacific/Chatham", 3, utc(2026, 9, 26), utc(2026, 9, 26, 14)),  # 03:45 +13:45
        ("Pacific/Chatham", 2, utc(2026, 9, 26), utc(2026, 9, 26, 13, 15)),  # 02:00 +12:45
        ("UTC", 5, utc(2026, 1, 1), utc(2026, 1, 1, 5)),
        ("UTC", 5, utc(2026, 1, 1, 5), utc(2026, 1, 2, 5)),
        ("UTC", 0, utc(2026, 12, 31, 23, 59), utc(2027, 1, 1)),
    ],
)
def test_next_run_at_examples(zone: str, hour: int, after: datetime, expected: datetime) -> None:
    got = next_run_at(daily(hour), zone, after)
    assert got == expected
    assert got.tzinfo is UTC


def test_new_york_2am_stays_2am_all_year() -> None:
    runs = upcoming_runs(daily(2), "America/New_York", utc(2026, 1, 1), 365)
    z = ZoneInfo("America/New_York")
    locals_ = [r.astimezone(z) for r in runs]
    # Every day at 02:00 local except 2026-03-08, which has no 02:00 and runs at 03:00.
    odd = [lt for lt in locals_ if (lt.hour, lt.minute) != (2, 0)]
    assert [(lt.date(), lt.hour, lt.minute) for lt in odd] == [(date(2026, 3, 8), 3, 0)]
    # The UTC hour changes with DST: 07:00 UTC in winter, 06:00 UTC in summer.
    assert {r.hour for r in runs if r.month == 1} == {7}
    assert {r.hour for r in runs if r.month == 7} == {6}
    assert [lt.date() for lt in locals_] == [
        date(2026, 1, 1) + timedelta(days=i) for i in range(365)
    ]


def test_apia_skipped_day_has_no_run() -> None:
    z = ZoneInfo("Pacific/Apia")
    runs = upcoming_runs(daily(10), z, utc(2011, 12, 27), 5)
    assert [r.astimezone(z).date() for r in runs] == [
        date(2011, 12, 27),
        date(2011, 12, 28),
        date(2011, 12, 29),
        date(2011, 12, 31),  # 2011-12-30 never happened in Samoa
        date(2012, 1, 1),
    ]
    assert runs[2] == utc(2011, 12, 29, 20)  # 10:00 -10:00
    assert runs[3] == utc(2011, 12, 30, 20)  # 10:00 +14:00, 24 hours later
    assert run_on_local_date(10, z, date(2011, 12, 30)) is None
    assert run_on_local_date(0, z, date(2011, 12, 30)) is None
    # Midnight of the 31st is the first instant after the skipped day and belongs to it.
    assert run_on_local_date(0, z, date(2011, 12, 31)) == utc(2011, 12, 30, 10)


def test_next_run_is_strictly_after() -> None:
    run = utc(2026, 6, 1, 6)  # 02:00 EDT
    assert next_run_at(daily(2), "America/New_York", run - timedelta(microseconds=1)) == run
    assert next_run_at(daily(2), "America/New_York", run) == run + timedelta(days=1)


def test_next_run_accepts_any_aware_timezone_and_zoneinfo() -> None:
    after = datetime(2026, 6, 1, 8, 0, tzinfo=ZoneInfo("Asia/Tokyo"))  # 2026-05-31 23:00 UTC
    got = next_run_at(daily(2), ZoneInfo("Europe/Paris"), after)
    assert got == utc(2026, 6, 1, 0)  # 02:00 CEST


def test_naive_datetimes_and_bad_zones_are_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        next_run_at(daily(2), "UTC", datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="unknown time zone"):
        next_run_at(daily(2), "Mars/Olympus_Mons", utc(2026, 1, 1))
    with pytest.raises(ValueError):
        resolve_zone("")
    with pytest.raises(ValueError):
        upcoming_runs(daily(2), "UTC", utc(2026, 1, 1), -1)


def test_weekly_runs_every_day_too() -> None:
    # Weekly policies run incrementals on the other days at the same hour.
    weekly = Schedule("weekly", 3, "monday")
    assert upcoming_runs(weekly, "UTC", utc(2026, 3, 1), 3) == [
        utc(2026, 3, 1, 3),
        utc(2026, 3, 2, 3),
        utc(2026, 3, 3, 3),
    ]


def test_slot_local_date_is_the_owner_date() -> None:
    weekly = Schedule("weekly", 3, "monday")
    # Monday 03:00 in Tokyo is Sunday 18:00 UTC.
    run = next_run_at(weekly, "Asia/Tokyo", utc(2026, 3, 8, 12))
    assert run == utc(2026, 3, 8, 18)
    assert slot_local_date(weekly, "Asia/Tokyo", run) == date(2026, 3, 9)
    # Honolulu, hour 23: the run is on the next UTC date.
    run = next_run_at(daily(23), "Pacific/Honolulu", utc(2026, 3, 9))
    assert run == utc(2026, 3, 9, 9)
    assert slot_local_date(daily(23), "Pacific/Honolulu", run) == date(2026, 3, 8)


def test_slot_local_date_of_a_late_pickup_is_the_due_slot() -> None:
    z = "America/New_York"
    run = next_run_at(daily(23), z, utc(2026, 6, 1, 12))  # 2026-06-01 23:00 EDT
    assert run == utc(2026, 6, 2, 3)
    assert slot_local_date(daily(23), z, run) == date(2026, 6, 1)
    # Picked up 2 hours late, after local midnight: still the 06-01 slot.
    assert slot_local_date(daily(23), z, run + timedelta(hours=2)) == date(2026, 6, 1)
    assert slot_local_date(daily(23), z, run - timedelta(seconds=1)) == date(2026, 5, 31)


def test_missed_slot_action() -> None:
    due = utc(2026, 1, 1, 2)
    grace = timedelta(hours=1)
    assert missed_slot_action(due, due, grace) == "run"
    assert missed_slot_action(due, due + grace, grace) == "run"
    assert missed_slot_action(due, due + grace + timedelta(seconds=1), grace) == "skip"
    assert missed_slot_action(due, due + timedelta(days=3), grace) == "skip"
    with pytest.raises(ValueError):
        missed_slot_action(due, datetime(2026, 1, 1, 3), grace)
    with pytest.raises(ValueError):
        missed_slot_action(due, due, timedelta(seconds=-1))
