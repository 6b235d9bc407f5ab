"""Retention: which chains are deleted."""

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.scheduling import ChainInfo, chains_to_delete

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def info(i: int, done: bool = True, day: int | None = None) -> ChainInfo:
    return ChainInfo(
        id=f"c{i}", started_at=T0 + timedelta(days=i if day is None else day), full_completed=done
    )


def test_keeps_retention_count_newest_completed_chains() -> None:
    chains = [info(i) for i in range(5)]
    assert chains_to_delete(chains, 3, "c4") == ["c0", "c1"]
    assert chains_to_delete(chains, 5, "c4") == []
    assert chains_to_delete(chains, 10, "c4") == []
    assert chains_to_delete(chains, 1, "c4") == ["c0", "c1", "c2", "c3"]


def test_input_order_does_not_matter() -> None:
    chains = [info(3), info(0), info(4), info(1), info(2)]
    assert chains_to_delete(chains, 2, "c4") == ["c0", "c1", "c2"]


def test_incomplete_chains_are_not_counted_nor_deleted() -> None:
    chains = [info(0), info(1, done=False), info(2), info(3, done=False), info(4)]
    # Three completed chains, retention 3: nothing to delete, failed ones stay.
    assert chains_to_delete(chains, 3, "c4") == []
    assert chains_to_delete(chains, 2, "c4") == ["c0"]


def test_failed_new_full_never_pushes_a_good_chain_out() -> None:
    chains = [info(0), info(1), info(2), info(3, done=False)]
    assert chains_to_delete(chains, 3, "c3") == []


def test_current_chain_is_never_deleted() -> None:
    # Odd data (current chain started earliest) must still not delete it.
    chains = [info(0), info(1), info(2)]
    assert chains_to_delete(chains, 1, "c0") == ["c1"]
    assert chains_to_delete(chains, 1, None) == ["c0", "c1"]


def test_bad_retention() -> None:
    with pytest.raises(ValueError):
        chains_to_delete([info(0)], 0, "c0")


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    chains=st.lists(
        st.tuples(st.integers(min_value=0, max_value=1000), st.booleans()),
        max_size=15,
        unique_by=lambda t: t[0],
    ),
    retention=st.integers(min_value=1, max_value=8),
    current=st.one_of(st.none(), st.integers(min_value=0, max_value=1000)),
)
def test_retention_property(
    chains: list[tuple[int, bool]], retention: int, current: int | None
) -> None:
    infos = [ChainInfo(i, T0 + timedelta(hours=i), done) for i, done in chains]
    deleted = chains_to_delete(infos, retention, current)
    completed = {i for i, done in chains if done}
    newest = set(sorted(completed)[-retention:])
    # Exactly the completed chains outside the newest `retention` ones, minus the current.
    assert set(deleted) == completed - newest - {current}
    assert len(deleted) == len(set(deleted))
    assert deleted == sorted(deleted)  # oldest first (start time grows with id here)
    assert len(completed) - len(deleted) >= min(retention, len(completed))
