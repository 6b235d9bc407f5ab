"""What a policy keeps on storage at steady state, per instance. Pure code.

The chain's length comes from :func:`plan_backup` itself (a fortnight of runs is planned from a
fresh full), so the estimate cannot disagree with what the scheduler does; the number of chains
kept comes from retention's rule (:func:`chains_to_delete` keeps ``retention_count`` completed
chains, the one being grown among them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Literal

from app.scheduling.plan import ChainState, plan_backup
from app.scheduling.schedule import Schedule, is_full_day

#: Without measured incrementals, one (a day of changes) is taken as this share of the disks.
ASSUMED_DAILY_CHANGE_PERCENT = 2
#: Measured incrementals considered: the instance's most recent ones.
MEASURED_INCREMENTALS = 30

FullBasis = Literal["measured", "allocated"]
IncrementalBasis = Literal["measured", "assumed"]


def incrementals_per_chain(schedule: Schedule, max_incremental_chain: int) -> int:
    """Incrementals a chain holds when the next full starts it anew, as planned day by day."""
    start = date(2026, 1, 4)  # a Sunday; weekly plans start on their full day
    while not is_full_day(schedule, start):
        start += timedelta(days=1)
    state = ChainState(0, True)
    for day in range(1, max_incremental_chain + 8):
        plan = plan_backup(schedule, max_incremental_chain, state, start + timedelta(days=day))
        if plan.kind == "full":
            break
        if plan.kind == "incremental":
            state = ChainState(state.incrementals + 1, True)
    return state.incrementals


@dataclass(frozen=True)
class InstanceFootprint:
    full_bytes: int
    full_basis: FullBasis
    incremental_bytes: int
    incremental_basis: IncrementalBasis
    stored_bytes: int


def instance_footprint(
    allocated_bytes: int,
    latest_full_bytes: int | None,
    measured_incrementals: Sequence[int],
    chains: int,
    incrementals: int,
) -> InstanceFootprint:
    """``chains`` chains of one full and ``incrementals`` incrementals each.

    The full is the latest measured full when there is one, else the allocated size of the
    disks; an incremental is the median of the measured ones (rounded to a byte), else
    :data:`ASSUMED_DAILY_CHANGE_PERCENT` of the allocated size (rounded down)."""
    full_basis: FullBasis = "allocated" if latest_full_bytes is None else "measured"
    full = allocated_bytes if latest_full_bytes is None else latest_full_bytes
    inc_basis: IncrementalBasis = "measured" if measured_incrementals else "assumed"
    inc = (
        median_bytes(measured_incrementals)
        if measured_incrementals
        else allocated_bytes * ASSUMED_DAILY_CHANGE_PERCENT // 100
    )
    stored = chains * (full + incrementals * inc)
    return InstanceFootprint(full, full_basis, inc, inc_basis, stored)


def median_bytes(sizes: Sequence[int]) -> int:
    """The median, exact in integers; between two middle sizes, their mean rounded half up."""
    ordered = sorted(sizes)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle] + 1) // 2
