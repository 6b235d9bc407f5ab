"""Run instants of a schedule, computed from the owner's IANA zone on each date.

Rules:

* A policy runs once per *local* day at ``hour``:00 in the owner's zone, whatever the
  frequency (weekly policies run incrementals on the other days at the same hour).
* Each run is computed from the zone on that date, so 2:00 AM stays 2:00 AM local all year.
* A local time that does not exist (spring-forward gap) runs at the first instant after the
  gap, e.g. New York 2026-03-08 02:00 -> 03:00 EDT (07:00 UTC).
* A local time that happens twice (fall back) runs once, at its first occurrence (fold=0).
* A local day with no instant at or after ``hour``:00 (a day skipped by the zone, such as
  Pacific/Apia 2011-12-30, or a gap that runs past local midnight) has no run.

All inputs must be timezone-aware; all returned instants are in UTC.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from app.scheduling.schedule import Schedule

ZoneLike = str | ZoneInfo

# How far around a reference date to look for runs. Runs are at most a couple of local days
# apart (a day can be skipped by the zone), so a week either side is ample.
_LOOKAROUND_DAYS = 8


def resolve_zone(zone: ZoneLike) -> ZoneInfo:
    """A ZoneInfo from an IANA name (or a ZoneInfo, returned as is); ValueError when unknown."""
    if isinstance(zone, ZoneInfo):
        return zone
    if not isinstance(zone, str) or not zone:
        raise ValueError("time zone must be a non-empty IANA zone name")
    try:
        return ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone: {zone!r}") from exc


def _as_utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")
    return value.astimezone(UTC)


def _wall(instant: datetime, zone: ZoneInfo) -> datetime:
    """Naive local wall-clock time of an instant."""
    return instant.astimezone(zone).replace(tzinfo=None)


def run_on_local_date(hour: int, zone: ZoneLike, day: date) -> datetime | None:
    """The UTC instant of the run on local date ``day``, or None when that day has no run.

    The run is the first instant whose local date is ``day`` and whose local wall time is at
    or after ``hour``:00: ``hour``:00 itself when it exists (its first occurrence when it
    happens twice), otherwise the end of the gap that swallowed it -- unless the gap runs
    past the end of ``day`` (the day has no run).
    """
    if not 0 <= hour <= 23:
        raise ValueError("hour must be an integer from 0 to 23")
    z = resolve_zone(zone)
    naive = datetime.combine(day, time(hour))
    first = naive.replace(tzinfo=z, fold=0).astimezone(UTC)
    if _wall(first, z) == naive:
        return first  # exists; fold=0 is the first occurrence when it is ambiguous

    # ``naive`` falls in a gap. PEP 495: fold=0 maps it with the offset before the gap and
    # fold=1 with the offset after it, so the transition instant lies between the two.
    second = naive.replace(tzinfo=z, fold=1).astimezone(UTC)
    lo = int(min(first, second).timestamp())
    hi = int(max(first, second).timestamp())

    def reached(ts: int) -> bool:
        return _wall(datetime.fromtimestamp(ts, UTC), z) >= naive

    if reached(lo) or not reached(hi):  # pragma: no cover - not seen in tzdata
        raise RuntimeError(f"cannot resolve local time {naive} in {z.key}")
    # Smallest whole second (zone transitions are on whole seconds) with wall >= naive.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if reached(mid):
            hi = mid
        else:
            lo = mid
    after_gap = datetime.fromtimestamp(hi, UTC)
    if after_gap.astimezone(z).date() != day:
        return None  # the rest of this local day does not exist
    return after_gap


def next_run_at(schedule: Schedule, zone: ZoneLike, after: datetime) -> datetime:
    """The first run instant strictly after ``after`` (aware), in UTC.

    Feeding the result back as ``after`` gives the next local day's run: runs strictly
    increase and every existing local day gets exactly one.
    """
    z = resolve_zone(zone)
    after_utc = _as_utc(after, "after")
    start = after_utc.astimezone(z).date()
    best: datetime | None = None
    for offset in range(-1, _LOOKAROUND_DAYS):
        run = run_on_local_date(schedule.hour, z, start + timedelta(days=offset))
        if run is not None and run > after_utc and (best is None or run < best):
            best = run
        if best is not None and offset >= 2:
            break
    if best is None:  # pragma: no cover - a zone skipping a whole week does not exist
        raise RuntimeError(f"no run found after {after_utc.isoformat()} in {z.key}")
    return best


def slot_local_date(schedule: Schedule, zone: ZoneLike, at_utc: datetime) -> date:
    """The slot (owner's local calendar date) served by the run at ``at_utc``.

    Pass the run's scheduled instant (``next_run_at``'s value): the slot is then simply its
    local date. For an instant later than a run (a tick that fires late, a catch-up run),
    the slot is the one of the most recent run at or before ``at_utc``, so a run due at
    23:00 and picked up after local midnight still serves the day it was due on.
    """
    z = resolve_zone(zone)
    at = _as_utc(at_utc, "at_utc")
    start = at.astimezone(z).date()
    best: datetime | None = None
    for offset in range(1, -_LOOKAROUND_DAYS, -1):
        run = run_on_local_date(schedule.hour, z, start + timedelta(days=offset))
        if run is not None and run <= at and (best is None or run > best):
            best = run
    if best is None:  # pragma: no cover - a zone skipping a whole week does not exist
        raise RuntimeError(f"no run found at or before {at.isoformat()} in {z.key}")
    return best.astimezone(z).date()


def missed_slot_action(due_at: datetime, now: datetime, grace: timedelta) -> Literal["run", "skip"]:
    """Catch-up rule for a due run: "run" when ``now - due_at <= grace``, else "skip".

    A run that is not yet due (``now < due_at``) also gives "run"; the caller only asks
    about due slots. After downtime the caller runs one catch-up and plans the next run
    from ``now``, never a burst of missed ones.
    """
    if grace < timedelta(0):
        raise ValueError("grace must not be negative")
    lateness = _as_utc(now, "now") - _as_utc(due_at, "due_at")
    return "run" if lateness <= grace else "skip"
