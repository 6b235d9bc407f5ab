"""Chain planning: examples for each rule and simulated sequences of slots."""

import uuid
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.scheduling import (
    DEVICE_CHANGED,
    NO_POLICY,
    STORAGE_CHANGED,
    WEEKDAYS,
    Chain,
    ChainState,
    Plan,
    Schedule,
    Weekday,
    plan_backup,
    plan_now,
    slot_local_date,
)
from tests.scheduling.runs import upcoming_runs

MONDAY = date(2026, 3, 9)
TUESDAY = date(2026, 3, 10)
DAILY = Schedule("daily", 2)
WEEKLY_MON = Schedule("weekly", 3, "monday")


def chain(incrementals: int) -> ChainState:
    return ChainState(incrementals=incrementals, base_usable=True)


# --- examples -------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [DAILY, WEEKLY_MON])
@pytest.mark.parametrize("slot", [MONDAY, TUESDAY])
@pytest.mark.parametrize("n", [0, 1, 6])
def test_first_backup_is_full_on_any_day(schedule: Schedule, slot: date, n: int) -> None:
    assert plan_backup(schedule, n, None, slot) == Plan("full", "first backup of the instance")


@pytest.mark.parametrize("schedule", [DAILY, WEEKLY_MON])
def test_unusable_base_gives_full_with_reason(schedule: Schedule) -> None:
    lost = ChainState(2, base_usable=False, reset_reason="previous full backup failed")
    assert plan_backup(schedule, 6, lost, TUESDAY) == Plan("full", "previous full backup failed")
    resized = ChainState(0, base_usable=False, reset_reason="disk vdb was resized")
    assert plan_backup(schedule, 0, resized, TUESDAY) == Plan("full", "disk vdb was resized")
    plain = plan_backup(schedule, 6, ChainState(3, base_usable=False), TUESDAY)
    assert plain.kind == "full"
    assert plain.reason


def test_backup_now_forced_full() -> None:
    assert plan_now(6, chain(1), True) == Plan("full", "full backup requested")
    assert plan_now(0, chain(0), True).kind == "full"


def test_daily_chain() -> None:
    assert plan_backup(DAILY, 6, chain(0), TUESDAY) == Plan("incremental", "incremental 1 of 6")
    assert plan_backup(DAILY, 6, chain(5), TUESDAY) == Plan("incremental", "incremental 6 of 6")
    assert plan_backup(DAILY, 6, chain(6), TUESDAY) == Plan("full", "chain reached 6 incrementals")
    assert plan_backup(DAILY, 6, chain(9), TUESDAY).kind == "full"  # N lowered since


def test_daily_full_only() -> None:
    for slot in (MONDAY, TUESDAY):
        assert plan_backup(DAILY, 0, chain(0), slot) == Plan("full", "full-only policy")


def test_weekly_full_day_is_always_full() -> None:
    assert plan_backup(WEEKLY_MON, 6, chain(1), MONDAY) == Plan("full", "weekly full day")
    assert plan_backup(WEEKLY_MON, 6, chain(6), MONDAY) == Plan("full", "weekly full day")
    assert plan_backup(WEEKLY_MON, 0, chain(0), MONDAY) == Plan("full", "weekly full day")


def test_weekly_other_days() -> None:
    assert plan_backup(WEEKLY_MON, 2, chain(0), TUESDAY) == Plan(
        "incremental", "incremental 1 of 2"
    )
    assert plan_backup(WEEKLY_MON, 2, chain(2), TUESDAY) == Plan(
        "skip", "chain is full until the weekly full on Monday"
    )
    assert plan_backup(WEEKLY_MON, 0, chain(0), TUESDAY) == Plan(
        "skip", "full-only weekly policy: next full on Monday"
    )


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        plan_backup(DAILY, -1, None, MONDAY)
    with pytest.raises(ValueError):
        ChainState(-1, True)


# --- simulated sequences --------------------------------------------------------------


def simulate(
    schedule: Schedule, n: int, slots: list[date], lost_before: set[int] | None = None
) -> list[Plan]:
    """Run plan_backup over successive slots, every planned backup succeeding."""
    lost_before = lost_before or set()
    state: ChainState | None = None
    plans = []
    for i, slot in enumerate(slots):
        if i in lost_before and state is not None:
            state = ChainState(state.incrementals, False, "checkpoint lost")
        plan = plan_backup(schedule, n, state, slot)
        plans.append(plan)
        if plan.kind == "full":
            state = ChainState(0, True)
        elif plan.kind == "incremental":
            assert state is not None
            state = ChainState(state.incrementals + 1, True)
    return plans


def consecutive(start: date, days: int) -> list[date]:
    return [start + timedelta(days=i) for i in range(days)]


def test_daily_spec_example() -> None:
    # Spec: chain length 6 -> day 1 full, days 2-7 incremental, day 8 full (new chain).
    kinds = [p.kind for p in simulate(DAILY, 6, consecutive(MONDAY, 15))]
    assert kinds == ["full"] + ["incremental"] * 6 + ["full"] + ["incremental"] * 6 + ["full"]


def test_weekly_spec_example() -> None:
    # Attached on a Wednesday: full now, incrementals until Monday's full, then 6 incrementals.
    wednesday = date(2026, 3, 11)
    kinds = [p.kind for p in simulate(WEEKLY_MON, 6, consecutive(wednesday, 12))]
    assert kinds == ["full"] + ["incremental"] * 4 + ["full"] + ["incremental"] * 6


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    n=st.integers(min_value=0, max_value=10),
    start=st.dates(min_value=date(2010, 1, 1), max_value=date(2030, 12, 31)),
    days=st.integers(min_value=1, max_value=60),
    lost=st.sets(st.integers(min_value=0, max_value=59), max_size=5),
)
def test_daily_sequence_property(n: int, start: date, days: int, lost: set[int]) -> None:
    plans = simulate(DAILY, n, consecutive(start, days), lost)
    kinds = [p.kind for p in plans]
    assert "skip" not in kinds
    assert kinds[0] == "full"
    # Split into chains at each full: every chain is a full then at most n incrementals,
    # and exactly n unless the next chain was started because the base was lost.
    fulls = [i for i, k in enumerate(kinds) if k == "full"]
    for a, b in zip(fulls, [*fulls[1:], len(kinds)], strict=True):
        incs = b - a - 1
        assert all(k == "incremental" for k in kinds[a + 1 : b])
        assert incs <= n
        if b < len(kinds) and b not in lost:
            assert incs == n, (a, b, kinds)
    for i in lost:
        if 0 < i < len(plans):
            assert plans[i] == Plan("full", "checkpoint lost")


def weekday_name(d: date) -> str:
    return d.strftime("%A").lower()  # independent of app.scheduling.local_weekday


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    n=st.integers(min_value=0, max_value=8),
    day=st.sampled_from(WEEKDAYS),
    start=st.dates(min_value=date(2010, 1, 1), max_value=date(2030, 12, 31)),
    days=st.integers(min_value=1, max_value=50),
)
def test_weekly_sequence_property(n: int, day: Weekday, start: date, days: int) -> None:
    schedule = Schedule("weekly", 4, day)
    slots = consecutive(start, days)
    plans = simulate(schedule, n, slots)
    assert plans[0].kind == "full"
    incs = 0
    for i, (slot, plan) in enumerate(zip(slots, plans, strict=True)):
        if i > 0:
            # After the first backup: full exactly on the chosen local weekday.
            assert (plan.kind == "full") == (weekday_name(slot) == day), (slot, plan)
        if plan.kind == "full":
            incs = 0
        elif plan.kind == "incremental":
            incs += 1
            assert incs <= n
        else:
            assert incs == n  # skipped only because the chain has no room left
            assert day.capitalize() in plan.reason
    if n >= 6:
        assert all(p.kind != "skip" for p in plans)


ZONES = ["America/New_York", "Asia/Tokyo", "Pacific/Apia", "Pacific/Chatham", "Pacific/Kiritimati"]


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    zone=st.sampled_from(ZONES),
    hour=st.integers(min_value=0, max_value=23),
    day=st.sampled_from(WEEKDAYS),
    start=st.datetimes(min_value=datetime(2010, 1, 1), max_value=datetime(2030, 12, 1)),
)
def test_weekly_full_lands_on_local_weekday(
    zone: str, hour: int, day: Weekday, start: datetime
) -> None:
    """End to end: runs -> slots -> plans; the full is on the owner's local weekday."""
    schedule = Schedule("weekly", hour, day)
    runs = upcoming_runs(schedule, zone, start.replace(tzinfo=UTC), 30)
    slots = [slot_local_date(schedule, zone, r) for r in runs]
    plans = simulate(schedule, 6, slots)
    fulls = [s for s, p in zip(slots, plans, strict=True) if p.kind == "full"][1:]
    assert len(fulls) >= 3
    assert all(weekday_name(s) == day for s in fulls)
    assert all(p.kind != "skip" for p in plans)


# --- Backup now -----------------------------------------------------------------------


def test_backup_now_grows_the_chain_like_a_daily_run() -> None:
    assert plan_now(2, chain(0), False) == Plan("incremental", "incremental 1 of 2")
    assert plan_now(2, chain(2), False) == Plan("full", "chain reached 2 incrementals")
    assert plan_now(0, chain(0), False) == Plan("full", "full-only policy")
    assert plan_now(2, None, False) == Plan("full", "first backup of the instance")


def test_backup_now_without_a_policy_is_always_a_full() -> None:
    assert plan_now(None, chain(1), False) == Plan("full", NO_POLICY)
    assert plan_now(None, None, False) == Plan("full", NO_POLICY)
    assert plan_now(None, chain(1), True) == Plan("full", "full backup requested")


def test_a_chain_of_other_disks_plans_a_full() -> None:
    other = Chain(chain(1), backup_device="primary")
    assert other.planning_state("all", None) == ChainState(1, False, DEVICE_CHANGED)
    assert other.planning_state("primary", None) == chain(1)
    assert plan_now(6, other.planning_state("all", None), False) == Plan("full", DEVICE_CHANGED)


def test_a_chain_on_another_storage_plans_a_full() -> None:
    here, elsewhere = uuid.uuid4(), uuid.uuid4()
    moved = Chain(chain(1), backup_device="all", storage_id=here)
    assert moved.planning_state("all", here) == chain(1)
    assert moved.planning_state("all", elsewhere) == ChainState(1, False, STORAGE_CHANGED)
    assert plan_now(6, moved.planning_state("all", elsewhere), False) == Plan(
        "full", STORAGE_CHANGED
    )
