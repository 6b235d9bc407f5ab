"""The plain sentence of what a policy runs, with the clock changes that move a backup."""

from datetime import date

import pytest

from app.scheduling import Schedule, backup_weekdays, schedule_sentence

JAN_1 = date(2026, 1, 1)


@pytest.mark.parametrize(
    ("schedule", "chain", "sentence"),
    [
        (
            Schedule("weekly", 3, "monday"),
            6,
            "Full every Monday at 3:00 AM; incrementals on the other days, up to 6 per chain",
        ),
        (
            Schedule("weekly", 3, "monday"),
            10,
            "Full every Monday at 3:00 AM; incrementals on the other days, up to 10 per chain",
        ),
        (
            Schedule("weekly", 1, "monday"),
            0,
            "Full every Monday at 1:00 AM; no backup on the other days",
        ),
        (
            Schedule("weekly", 14, "friday"),
            1,
            "Full every Friday at 2:00 PM; an incremental on Saturday; no backup on Sunday to "
            "Thursday",
        ),
        (
            Schedule("weekly", 2, "saturday"),
            2,
            "Full every Saturday at 2:00 AM; incrementals on Sunday and Monday; no backup on "
            "Tuesday to Friday",
        ),
        (
            Schedule("weekly", 0, "sunday"),
            5,
            "Full every Sunday at 12:00 AM; incrementals on Monday to Friday; no backup on "
            "Saturday",
        ),
        (Schedule("daily", 12), 0, "Full every day at 12:00 PM"),
        (
            Schedule("daily", 2),
            6,
            "Every day at 2:00 AM: a full, then up to 6 incrementals before the next full",
        ),
        (
            Schedule("daily", 2),
            1,
            "Every day at 2:00 AM: a full, then up to 1 incremental before the next full",
        ),
    ],
)
def test_sentence_says_what_each_day_takes(schedule: Schedule, chain: int, sentence: str) -> None:
    assert schedule_sentence(schedule, chain, "UTC", JAN_1) == sentence


def test_a_zone_without_clock_changes_adds_nothing() -> None:
    for zone in ("UTC", "Asia/Kolkata", "Asia/Tokyo"):
        assert "Clocks" not in schedule_sentence(Schedule("daily", 2), 6, zone, JAN_1)


def test_new_york_spring_forward_moves_2am_to_3am_and_fall_back_repeats_1am() -> None:
    assert schedule_sentence(Schedule("daily", 2), 0, "America/New_York", JAN_1) == (
        "Full every day at 2:00 AM. Clocks go forward on Sunday, March 8, 2026: that day's "
        "backup runs at 3:00 AM"
    )
    assert schedule_sentence(Schedule("daily", 1), 0, "America/New_York", JAN_1) == (
        "Full every day at 1:00 AM. Clocks go back on Sunday, November 1, 2026: 1:00 AM "
        "happens twice and the backup runs at the first"
    )


def test_an_hour_untouched_by_the_change_gets_no_note() -> None:
    # New York changes between 1:00 and 3:00 only.
    assert "Clocks" not in schedule_sentence(Schedule("daily", 4), 0, "America/New_York", JAN_1)


def test_berlin_weekly_sunday_at_2am_names_both_changes_of_the_coming_year() -> None:
    assert schedule_sentence(Schedule("weekly", 2, "sunday"), 0, "Europe/Berlin", JAN_1) == (
        "Full every Sunday at 2:00 AM; no backup on the other days. Clocks go forward on "
        "Sunday, March 29, 2026: that day's backup runs at 3:00 AM. Clocks go back on Sunday, "
        "October 25, 2026: 2:00 AM happens twice and the backup runs at the first"
    )


def test_a_clock_change_on_a_day_without_a_backup_is_not_mentioned() -> None:
    # Berlin changes on Sundays; a Monday full-only policy never runs on one.
    sentence = schedule_sentence(Schedule("weekly", 2, "monday"), 0, "Europe/Berlin", JAN_1)
    assert sentence == "Full every Monday at 2:00 AM; no backup on the other days"


def test_only_the_coming_year_is_described() -> None:
    # After the 2026 autumn change, the next one named is spring 2027.
    sentence = schedule_sentence(Schedule("daily", 2), 0, "America/New_York", date(2026, 11, 2))
    assert "Sunday, March 14, 2027: that day's backup runs at 3:00 AM" in sentence
    assert "2026" not in sentence


def test_half_hour_shift_runs_at_half_past_and_southern_hemisphere_dates() -> None:
    # Lord Howe moves its clocks by 30 minutes at 2:00 AM: on 2026-10-04 2:00 becomes 2:30.
    lord_howe = schedule_sentence(Schedule("daily", 2), 0, "Australia/Lord_Howe", JAN_1)
    assert "Clocks go forward on Sunday, October 4, 2026: that day's backup runs at 2:30 AM" in (
        lord_howe
    )
    # Sydney: back on 2026-04-05 (3:00 -> 2:00), forward on 2026-10-04 (2:00 -> 3:00).
    sydney = schedule_sentence(Schedule("daily", 2), 0, "Australia/Sydney", JAN_1)
    assert "Clocks go back on Sunday, April 5, 2026: 2:00 AM happens twice" in sydney
    assert "Clocks go forward on Sunday, October 4, 2026: that day's backup runs at 3:00 AM" in (
        sydney
    )


def test_a_day_skipped_by_the_zone_has_no_backup() -> None:
    # Samoa skipped Friday 2011-12-30 when it crossed the date line.
    sentence = schedule_sentence(Schedule("daily", 10), 0, "Pacific/Apia", date(2011, 11, 1))
    assert "Clocks go forward on Friday, December 30, 2011: that day has no 10:00 AM and no " in (
        sentence
    )


def test_midnight_swallowed_by_a_gap_runs_at_the_end_of_the_gap() -> None:
    # Santiago moves from 24:00 to 01:00 on 2026-09-06: that day has no 12:00 AM, and
    # run_on_local_date runs at the end of the gap, 1:00 AM, which is still that day.
    sentence = schedule_sentence(Schedule("daily", 0), 0, "America/Santiago", JAN_1)
    assert "Clocks go forward on Sunday, September 6, 2026: that day's backup runs at 1:00 AM" in (
        sentence
    )


def test_backup_weekdays() -> None:
    assert backup_weekdays(Schedule("weekly", 2, "saturday"), 2) == (
        "saturday",
        "sunday",
        "monday",
    )
    assert len(backup_weekdays(Schedule("daily", 2), 0)) == 7
    assert len(backup_weekdays(Schedule("weekly", 2, "friday"), 12)) == 7
