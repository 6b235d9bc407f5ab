"""The plain sentence of what a policy runs, in the owner's zone, clock changes included.

``schedule_summary`` (schedule.py) says when the policy is looked at ("Weekly on Monday at
3:00 AM"); this says what each day takes, and what a clock change does to the hour on a day
that takes a backup within the coming year.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from app.scheduling.schedule import WEEKDAYS, Schedule, format_hour, local_weekday
from app.scheduling.times import ZoneLike, resolve_zone, run_on_local_date
from app.values import Frequency, Weekday

# How far ahead clock changes are looked for.
_HORIZON_DAYS = 366


def backup_weekdays(schedule: Schedule, max_incremental_chain: int) -> tuple[Weekday, ...]:
    """The local weekdays that take a backup in steady state (all seven for a daily policy)."""
    if schedule.frequency == Frequency.DAILY:
        return WEEKDAYS
    assert schedule.day_of_week is not None
    start = WEEKDAYS.index(schedule.day_of_week)
    return tuple(WEEKDAYS[(start + i) % 7] for i in range(min(max_incremental_chain, 6) + 1))


def _days(names: list[Weekday]) -> str:
    words = [n.capitalize() for n in names]
    if len(words) == 1:
        return words[0]
    if len(words) == 2:
        return f"{words[0]} and {words[1]}"
    return f"{words[0]} to {words[-1]}"


def _what_runs(schedule: Schedule, n: int) -> str:
    at = format_hour(schedule.hour)
    plural = "incremental" if n == 1 else "incrementals"
    if schedule.frequency == Frequency.DAILY:
        if n == 0:
            return f"Full every day at {at}"
        return f"Every day at {at}: a full, then up to {n} {plural} before the next full"
    assert schedule.day_of_week is not None
    head = f"Full every {schedule.day_of_week.capitalize()} at {at}"
    if n == 0:
        return f"{head}; no backup on the other days"
    if n >= 6:
        return f"{head}; incrementals on the other days, up to {n} per chain"
    taking = list(backup_weekdays(schedule, n)[1:])
    idle = [d for d in WEEKDAYS[WEEKDAYS.index(taking[-1]) + 1 :] + WEEKDAYS if d not in taking]
    idle = idle[: 6 - n]
    what = "an incremental" if n == 1 else "incrementals"
    return f"{head}; {what} on {_days(taking)}; no backup on {_days(idle)}"


def _long_date(d: date) -> str:
    return f"{d.strftime('%A')}, {d.strftime('%B')} {d.day}, {d.year}"


def clock_change_notes(
    schedule: Schedule, max_incremental_chain: int, zone: ZoneLike, today: date
) -> list[str]:
    """What the next clock changes (within a year of ``today``) do to a day with a backup.

    The rules are run_on_local_date's: a skipped hour runs at the end of the gap (or not at
    all when the gap ends the day); a repeated hour runs once, at its first occurrence.
    """
    z = resolve_zone(zone)
    days = set(backup_weekdays(schedule, max_incremental_chain))
    naive = time(schedule.hour)
    notes: list[str] = []
    gap_seen = fold_seen = False
    for offset in range(_HORIZON_DAYS):
        day = today + timedelta(days=offset)
        if local_weekday(day) not in days:
            continue
        wall = datetime.combine(day, naive)
        first = wall.replace(tzinfo=z, fold=0)
        second = wall.replace(tzinfo=z, fold=1)
        if first.utcoffset() == second.utcoffset():
            continue  # an ordinary day
        run = run_on_local_date(schedule.hour, z, day)
        at_first = first.astimezone(UTC).astimezone(z).replace(tzinfo=None) == wall
        if not at_first and not gap_seen:  # the hour falls in a gap
            gap_seen = True
            if run is None:
                notes.append(
                    f"Clocks go forward on {_long_date(day)}: that day has no "
                    f"{format_hour(schedule.hour)} and no backup"
                )
            else:
                local = run.astimezone(z)
                label = local.strftime("%-I:%M %p")
                notes.append(
                    f"Clocks go forward on {_long_date(day)}: that day's backup runs at {label}"
                )
        elif at_first and not fold_seen:  # the hour happens twice
            fold_seen = True
            notes.append(
                f"Clocks go back on {_long_date(day)}: {format_hour(schedule.hour)} happens "
                "twice and the backup runs at the first"
            )
        if gap_seen and fold_seen:
            break
    return notes


def schedule_sentence(
    schedule: Schedule, max_incremental_chain: int, zone: ZoneLike, today: date
) -> str:
    """ "Full every Monday at 3:00 AM; incrementals on the other days, up to 6 per chain",
    then the coming clock changes that move a backup, one sentence each."""
    parts = [_what_runs(schedule, max_incremental_chain)]
    parts += clock_change_notes(schedule, max_incremental_chain, zone, today)
    return ". ".join(parts)
