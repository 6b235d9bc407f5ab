"""A policy's steady-state footprint: chain length as planned, sizes measured or assumed."""

from hypothesis import given
from hypothesis import strategies as st

from app.scheduling import Schedule
from app.scheduling.footprint import (
    incrementals_per_chain,
    instance_footprint,
    median_bytes,
)
from app.values import Frequency, Weekday

DAILY = Schedule(Frequency.DAILY, 2, None)


@given(st.integers(min_value=0, max_value=30))
def test_a_daily_chain_holds_max_incremental_chain_incrementals(n: int) -> None:
    assert incrementals_per_chain(DAILY, n) == n


@given(st.integers(min_value=0, max_value=30), st.sampled_from(list(Weekday)))
def test_a_weekly_chain_holds_at_most_six_incrementals(n: int, day: Weekday) -> None:
    # The full comes back on its weekday whatever room the chain has left.
    assert incrementals_per_chain(Schedule(Frequency.WEEKLY, 3, day), n) == min(n, 6)


def test_median_is_exact_and_rounds_a_half_up() -> None:
    assert median_bytes([5, 1, 3]) == 3
    assert median_bytes([4, 1, 2, 9]) == 3  # (2 + 4) / 2
    assert median_bytes([1, 2]) == 2  # 1.5 rounds up
    big = 2**62
    assert median_bytes([big, big + 1]) == big + 1  # no float rounding


def test_measured_sizes_win_over_the_allocated_size() -> None:
    f = instance_footprint(100_000, 40_000, [1_000, 3_000, 2_000], chains=3, incrementals=6)
    assert (f.full_bytes, f.full_basis) == (40_000, "measured")
    assert (f.incremental_bytes, f.incremental_basis) == (2_000, "measured")
    assert f.stored_bytes == 3 * (40_000 + 6 * 2_000)


def test_without_history_a_full_is_allocated_and_an_incremental_two_percent() -> None:
    f = instance_footprint(100_001, None, [], chains=2, incrementals=4)
    assert (f.full_bytes, f.full_basis) == (100_001, "allocated")
    assert (f.incremental_bytes, f.incremental_basis) == (2_000, "assumed")  # rounded down
    assert f.stored_bytes == 2 * (100_001 + 4 * 2_000)


@given(
    st.integers(min_value=0, max_value=2**50),
    st.none() | st.integers(min_value=0, max_value=2**50),
    st.lists(st.integers(min_value=0, max_value=2**40), max_size=30),
    st.integers(min_value=1, max_value=365),
    st.integers(min_value=0, max_value=30),
)
def test_stored_bytes_are_chains_of_a_full_and_incrementals(
    allocated: int, full: int | None, measured: list[int], chains: int, incrementals: int
) -> None:
    f = instance_footprint(allocated, full, measured, chains, incrementals)
    assert f.stored_bytes == chains * (f.full_bytes + incrementals * f.incremental_bytes)
    if measured:
        assert min(measured) <= f.incremental_bytes <= max(measured)
