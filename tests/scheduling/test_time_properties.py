"""Property tests for run instants over tricky zones and a sample of every IANA zone.

Expectations are computed independently of the implementation: from the local wall-clock
fields of each run, the set of UTC offsets the zone uses around it, and brute-force scans.
"""

from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo, available_timezones

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.scheduling import (
    WEEKDAYS,
    Schedule,
    next_run_at,
    slot_local_date,
)
from tests.scheduling.runs import upcoming_runs

TRICKY_ZONES = [
    "America/New_York",
    "Europe/London",
    "Australia/Lord_Howe",
    "Pacific/Apia",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Pacific/Chatham",
    "UTC",
    "America/Santiago",  # transitions at local midnight
    "America/Havana",  # transitions at local midnight
    "Asia/Gaza",  # transitions at odd local times
    "Africa/Casablanca",  # DST suspended during Ramadan: several changes a year
    "Antarctica/Troll",  # two-hour DST
]
ALL_ZONES = sorted(available_timezones())

zones = st.one_of(st.sampled_from(TRICKY_ZONES), st.sampled_from(ALL_ZONES))
hours = st.integers(min_value=0, max_value=23)
instants = st.one_of(
    st.datetimes(min_value=datetime(2010, 1, 1), max_value=datetime(2030, 1, 1)),
    # Around Samoa's skipped day and the DST changes of 2026.
    st.datetimes(min_value=datetime(2011, 12, 1), max_value=datetime(2011, 12, 31)),
    st.datetimes(min_value=datetime(2026, 2, 20), max_value=datetime(2026, 4, 10)),
    st.datetimes(min_value=datetime(2026, 9, 20), max_value=datetime(2026, 11, 10)),
).map(lambda d: d.replace(tzinfo=UTC))
schedules = st.one_of(
    st.builds(Schedule, frequency=st.just("daily"), hour=hours),
    st.builds(
        Schedule, frequency=st.just("weekly"), hour=hours, day_of_week=st.sampled_from(WEEKDAYS)
    ),
)

PROFILE = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

ONE_SECOND = timedelta(seconds=1)


def wall(instant: datetime, zone: ZoneInfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None)


def offsets_between(zone: ZoneInfo, start: datetime, end: datetime) -> set[timedelta]:
    """Every UTC offset the zone uses in [start, end] (sampled every 30 minutes)."""
    found: set[timedelta] = set()
    t = start
    while t <= end:
        off = t.astimezone(zone).utcoffset()
        assert off is not None
        found.add(off)
        t += timedelta(minutes=30)
    return found


def occurrences(naive: datetime, zone: ZoneInfo, offsets: set[timedelta]) -> list[datetime]:
    """All UTC instants whose local wall time in ``zone`` is ``naive``."""
    candidates = {(naive - off).replace(tzinfo=UTC) for off in offsets}
    return sorted(t for t in candidates if wall(t, zone) == naive)


def check_run(run: datetime, hour: int, zone: ZoneInfo, offsets: set[timedelta]) -> None:
    """``run`` is the run of its local date: hour:00 (first occurrence) or right after the gap."""
    assert run.tzinfo is UTC
    local = wall(run, zone)
    naive = datetime.combine(local.date(), time(hour))
    found = occurrences(naive, zone, offsets)
    if found:
        # The local hour exists: the run is at exactly hour:00, its first occurrence.
        assert (local.hour, local.minute, local.second, local.microsecond) == (hour, 0, 0, 0)
        assert run == found[0], (run, found)
    else:
        # hour:00 does not exist that day: the run is the first instant after the gap.
        assert local > naive
        assert wall(run - ONE_SECOND, zone) < naive
        assert local - naive <= timedelta(hours=24)


def day_has_no_run(day: date, hour: int, zone: ZoneInfo, lo: datetime, hi: datetime) -> bool:
    """Brute force: no instant in (lo, hi) has local date ``day`` at or after hour:00."""
    t = lo + timedelta(minutes=1)
    while t < hi:
        local = wall(t, zone)
        if local.date() == day and local.time() >= time(hour):
            return False
        t += timedelta(minutes=1)
    return True


@settings(PROFILE, max_examples=120)
@given(zone_name=zones, schedule=schedules, start=instants)
def test_long_sequence_one_run_per_local_day(
    zone_name: str, schedule: Schedule, start: datetime
) -> None:
    zone = ZoneInfo(zone_name)
    runs = upcoming_runs(schedule, zone, start, 400)
    assert runs[0] > start
    assert all(a < b for a, b in pairwise(runs)), "runs strictly increase"
    # Feeding a run back gives the next one.
    assert next_run_at(schedule, zone_name, runs[10]) == runs[11]
    offsets = offsets_between(zone, start - timedelta(days=2), runs[-1] + timedelta(days=2))
    dates = [wall(r, zone).date() for r in runs]
    for run, day in zip(runs, dates, strict=True):
        check_run(run, schedule.hour, zone, offsets)
        assert slot_local_date(schedule, zone, run) == day
    # Exactly one run per local day: dates go up by one, except days without a run.
    for (r0, d0), (r1, d1) in pairwise(zip(runs, dates, strict=True)):
        assert d1 > d0, "a local day got two runs"
        if d1 - d0 > timedelta(days=1):
            assert d1 - d0 <= timedelta(days=3)
            for k in range(1, (d1 - d0).days):
                assert day_has_no_run(d0 + timedelta(days=k), schedule.hour, zone, r0, r1)
    # The start's own local day: its run is either before `start` or the first run.
    d_start = wall(start, zone).date()
    assert dates[0] in (d_start, d_start + timedelta(days=1), d_start + timedelta(days=2))


def brute_force_runs(
    hour: int, zone: ZoneInfo, start: datetime, end: datetime
) -> dict[date, datetime]:
    """First instant of each local date at or after hour:00, by scanning every minute."""
    firsts: dict[date, datetime] = {}
    t = start.replace(second=0, microsecond=0)
    target = time(hour)
    while t <= end:
        local = wall(t, zone)
        if local.time() >= target and local.date() not in firsts:
            firsts[local.date()] = t
        t += timedelta(minutes=1)
    return firsts


@settings(PROFILE, max_examples=60)
@given(zone_name=zones, schedule=schedules, start=instants)
def test_matches_brute_force(zone_name: str, schedule: Schedule, start: datetime) -> None:
    zone = ZoneInfo(zone_name)
    firsts = brute_force_runs(
        schedule.hour, zone, start - timedelta(days=2), start + timedelta(days=3)
    )
    expected = sorted(t for d, t in firsts.items() if t > start and d > min(firsts))[:2]
    assert upcoming_runs(schedule, zone_name, start, 2) == expected


@settings(PROFILE, max_examples=40)
@given(zone_name=st.sampled_from(TRICKY_ZONES), hour=hours, start=instants)
def test_weekly_and_daily_run_at_the_same_instants(
    zone_name: str, hour: int, start: datetime
) -> None:
    daily = upcoming_runs(Schedule("daily", hour), zone_name, start, 20)
    weekly = upcoming_runs(Schedule("weekly", hour, "friday"), zone_name, start, 20)
    assert daily == weekly


@settings(PROFILE, max_examples=60)
@given(zone_name=zones, schedule=schedules, start=instants, late=st.integers(0, 23 * 3600))
def test_slot_of_a_late_pickup(
    zone_name: str, schedule: Schedule, start: datetime, late: int
) -> None:
    """An instant between a run and the next one belongs to that run's slot."""
    zone = ZoneInfo(zone_name)
    run, following = upcoming_runs(schedule, zone, start, 2)
    at = min(run + timedelta(seconds=late), following - ONE_SECOND)
    assert slot_local_date(schedule, zone_name, at) == wall(run, zone).date()
