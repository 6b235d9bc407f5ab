"""Which runs of a schedule take a backup: the next one, and the longest wait between two.

A policy is looked at every local day at its hour (``next_run_at`` in times.py), but on some
days it takes nothing: a weekly full-only policy skips six days of seven, a weekly policy whose
chain is full skips until its full day. What the owner is shown, and what the recovery-point
objective is measured against, are the runs that take a backup, as :func:`plan_backup` decides.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from app.scheduling.plan import ChainState, plan_backup
from app.scheduling.schedule import Schedule
from app.scheduling.times import ZoneLike, next_run_at, resolve_zone
from app.values import Frequency

# A weekly policy takes a backup at least once every 7 local days; a zone can skip a day.
_SLOTS_AHEAD = 9


def steady_state(
    schedule: Schedule, max_incremental_chain: int, zone: ZoneLike, at: datetime
) -> ChainState:
    """The chain of an instance that has followed the schedule without a failure, at ``at``.

    What a policy without instances is planned with: its runs as they would be."""
    z = resolve_zone(zone)
    state: ChainState | None = ChainState(max_incremental_chain, True)  # a full chain
    cursor = next_run_at(schedule, z, at - timedelta(days=8))
    while cursor <= at:
        state = state_after(schedule, max_incremental_chain, state, cursor, z)
        cursor = next_run_at(schedule, z, cursor)
    assert state is not None  # a usable chain stays usable
    return state


def state_after(
    schedule: Schedule,
    max_incremental_chain: int,
    state: ChainState | None,
    slot: datetime,
    zone: ZoneLike,
) -> ChainState | None:
    """The chain state once the run at ``slot`` has done what it plans (assumed to succeed)."""
    local_date = slot.astimezone(resolve_zone(zone)).date()
    plan = plan_backup(schedule, max_incremental_chain, state, local_date)
    if plan.kind == "full":
        return ChainState(0, True)
    if plan.kind == "incremental":
        assert state is not None
        return ChainState(state.incrementals + 1, True)
    return state


def next_backup_at(
    schedule: Schedule,
    max_incremental_chain: int,
    zone: ZoneLike,
    after: datetime,
    states: Iterable[ChainState | None] | None = None,
) -> datetime:
    """The first run strictly after ``after`` that takes a backup of some instance.

    ``states``: the chain state of each attached instance (None: it has no backup yet, so its
    next run is a full, whatever the day). None or empty: the policy has no instances, and
    the answer is the next run that would take one in the schedule's steady state.
    """
    z = resolve_zone(zone)
    first = next_run_at(schedule, z, after)
    if schedule.frequency == Frequency.DAILY:
        return first  # a daily run always takes a full or an incremental
    distinct = set(states) if states is not None else set()
    if not distinct:
        distinct = {steady_state(schedule, max_incremental_chain, z, after)}
    slots = [first]
    while len(slots) < _SLOTS_AHEAD:
        slots.append(next_run_at(schedule, z, slots[-1]))
    best: datetime | None = None
    for state in distinct:
        for slot in slots:
            if best is not None and slot >= best:
                break
            local_date = slot.astimezone(z).date()
            if plan_backup(schedule, max_incremental_chain, state, local_date).kind != "skip":
                best = slot
                break
    if best is None:  # pragma: no cover - a weekly full day comes within any 9 runs
        raise RuntimeError(f"no backup within {_SLOTS_AHEAD} runs after {after.isoformat()}")
    return best


def longest_gap_days(schedule: Schedule, max_incremental_chain: int) -> int:
    """The most local days between two consecutive runs that take a backup, in steady state.

    Daily: 1. Weekly: the full day and the ``min(chain, 6)`` days after it take one, so the
    gap is ``7 - min(chain, 6)`` (7 for a full-only weekly policy, 1 with a chain of 6 or more).
    """
    if schedule.frequency == Frequency.DAILY:
        return 1
    return 7 - min(max_incremental_chain, 6)
