"""What the next backup of an instance is: full, incremental, or nothing.

Pure code: the caller reads the chain from the database and the slot date from
:func:`app.scheduling.slot_local_date`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Literal

from app.scheduling.schedule import Schedule, is_full_day

PlanKind = Literal["full", "incremental", "skip"]


@dataclass(frozen=True)
class ChainState:
    """The instance's current chain, as far as planning needs it.

    ``incrementals``: completed incrementals in the current chain after its completed full.
    ``base_usable``: a completed full (and a completed tip) exists to build on; False after a
    failed full, a lost checkpoint, a disk added or resized...
    ``reset_reason``: why the base is not usable, recorded as the reason of the next full.
    """

    incrementals: int
    base_usable: bool
    reset_reason: str | None = None

    def __post_init__(self) -> None:
        if self.incrementals < 0:
            raise ValueError("incrementals must not be negative")


@dataclass(frozen=True)
class Plan:
    kind: PlanKind
    reason: str


def _day_name(schedule: Schedule) -> str:
    return (schedule.day_of_week or "").capitalize()


def plan_backup(
    schedule: Schedule,
    max_incremental_chain: int,
    chain: ChainState | None,
    slot_date: date,
    force_full: bool = False,
) -> Plan:
    """Plan the backup of one slot (``slot_date`` is the owner's local date of the run).

    Order of the rules:
    1. ``force_full`` -> full.
    2. No chain yet, or no usable base -> full, on any day.
    3. ``max_incremental_chain == 0`` (full only): daily -> full every run; weekly -> full on
       the chosen weekday, skip on the other days.
    4. Daily: incremental while the chain has fewer than N incrementals, else a full that
       starts a new chain.
    5. Weekly: full on the chosen weekday (even when the chain has room); on other days
       incremental while the chain has room, else skip until the full day.
    """
    if max_incremental_chain < 0:
        raise ValueError("max_incremental_chain must not be negative")
    n = max_incremental_chain

    if force_full:
        return Plan("full", "full backup requested")
    if chain is None:
        return Plan("full", "first backup of the instance")
    if not chain.base_usable:
        return Plan("full", chain.reset_reason or "no usable full backup to build on")

    if schedule.frequency == "weekly":
        day = _day_name(schedule)
        if is_full_day(schedule, slot_date):
            return Plan("full", "weekly full day")
        if n == 0:
            return Plan("skip", f"full-only weekly policy: next full on {day}")
        if chain.incrementals < n:
            return Plan("incremental", f"incremental {chain.incrementals + 1} of {n}")
        return Plan("skip", f"chain is full until the weekly full on {day}")

    if n == 0:
        return Plan("full", "full-only policy")
    if chain.incrementals < n:
        return Plan("incremental", f"incremental {chain.incrementals + 1} of {n}")
    return Plan("full", f"chain reached {n} incrementals")
