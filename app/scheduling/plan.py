"""Full, incremental or skip, and why: every such decision is made here.

Pure code, fed by one query of the instance's chain (app.engine.chains.chain_states):
- the scheduler tick and the schedule preview plan a slot with :func:`plan_backup`;
- "Backup now" plans with :func:`plan_now`;
- the backup job's last check, with what libvirt reports at that moment, is :func:`decide`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Literal

from app.scheduling.schedule import Schedule, is_full_day

PlanKind = Literal["full", "incremental", "skip"]

DEVICE_CHANGED = "backup device setting changed"
# An incremental's parent must be on the storage it is written to, or it cannot be restored.
STORAGE_CHANGED = "the hypervisor's backup storage changed"
RESTORED = "instance was restored from a backup"
FULL_FAILED = "previous full backup failed"
FILES_MISSING = "a file of the current chain is missing from the backup storage"
# Without a policy there is no chain length to respect: every manual backup is a full.
NO_POLICY = "no backup policy: a manual backup without one is always a full"


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
class Chain:
    """What the catalog says of an instance's current chain: what planning needs and what an
    incremental builds on."""

    state: ChainState | None  # None: the instance has never had a backup
    chain_id: uuid.UUID | None = None
    tip_id: uuid.UUID | None = None  # newest completed backup of the chain: the parent
    tip_checkpoint: str | None = None
    backup_device: str | None = None
    disks: Sequence[Mapping[str, object]] = field(default_factory=tuple)  # target, size_bytes
    storage_id: uuid.UUID | None = None  # where the chain's files are
    busy: bool = False  # a backup or a restore of the instance is queued or running

    def planning_state(self, backup_device: str, storage_id: uuid.UUID | None) -> ChainState | None:
        """The state to plan a backup of `backup_device` to `storage_id` (the hypervisor's
        storage now) with: a chain of other disks, or on another storage, cannot take an
        incremental."""
        state = self.state
        if state is None or not state.base_usable:
            return state
        if self.backup_device != backup_device:
            return ChainState(state.incrementals, False, DEVICE_CHANGED)
        if storage_id is not None and self.storage_id != storage_id:
            return ChainState(state.incrementals, False, STORAGE_CHANGED)
        return state


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
) -> Plan:
    """Plan the backup of one slot (``slot_date`` is the owner's local date of the run).

    Order of the rules:
    1. No chain yet, or no usable base -> full, on any day.
    2. ``max_incremental_chain == 0`` (full only): daily -> full every run; weekly -> full on
       the chosen weekday, skip on the other days.
    3. Daily: incremental while the chain has fewer than N incrementals, else a full that
       starts a new chain.
    4. Weekly: full on the chosen weekday (even when the chain has room); on other days
       incremental while the chain has room, else skip until the full day.
    """
    if max_incremental_chain < 0:
        raise ValueError("max_incremental_chain must not be negative")
    n = max_incremental_chain
    if (first := _must_be_full(chain, force_full=False)) is not None:
        return first
    assert chain is not None
    if schedule.frequency == "weekly":
        day = _day_name(schedule)
        if is_full_day(schedule, slot_date):
            return Plan("full", "weekly full day")
        if n == 0:
            return Plan("skip", f"full-only weekly policy: next full on {day}")
        if chain.incrementals < n:
            return Plan("incremental", f"incremental {chain.incrementals + 1} of {n}")
        return Plan("skip", f"chain is full until the weekly full on {day}")
    return _grow_or_restart(n, chain)


def plan_now(max_incremental_chain: int | None, chain: ChainState | None, force_full: bool) -> Plan:
    """Backup now, by the policy's chain length (None: the instance has no policy).

    Never a skip: incremental while the chain has room, else a full that starts a new chain,
    as a daily run would.
    """
    if max_incremental_chain is None and not force_full:
        return Plan("full", NO_POLICY)
    if (first := _must_be_full(chain, force_full)) is not None:
        return first
    assert chain is not None and max_incremental_chain is not None
    return _grow_or_restart(max_incremental_chain, chain)


def _must_be_full(chain: ChainState | None, force_full: bool) -> Plan | None:
    if force_full:
        return Plan("full", "full backup requested")
    if chain is None:
        return Plan("full", "first backup of the instance")
    if not chain.base_usable:
        return Plan("full", chain.reset_reason or "no usable full backup to build on")
    return None


def _grow_or_restart(n: int, chain: ChainState) -> Plan:
    if n == 0:
        return Plan("full", "full-only policy")
    if chain.incrementals < n:
        return Plan("incremental", f"incremental {chain.incrementals + 1} of {n}")
    return Plan("full", f"chain reached {n} incrementals")


@dataclass
class Decision:
    """What the backup job takes, decided just before it starts libvirt's job."""

    type: str
    parent_id: uuid.UUID | None
    chain_id: uuid.UUID
    incremental_from: str | None  # the parent's checkpoint
    reset_reason: str | None


def why_not_incremental(
    chain: Chain,
    backup_device: str,
    storage_id: uuid.UUID | None,
    disks: Mapping[str, int],
    checkpoints: Sequence[str],
) -> str | None:
    """Why the chain cannot take an incremental now, or None when it can.

    `storage_id`: where this backup goes; `disks`: target -> virtual size of the disks to back
    up now; `checkpoints`: the domain's.
    """
    if chain.state is None or chain.chain_id is None or chain.tip_id is None:
        return "no completed full backup to build on"
    state = chain.planning_state(backup_device, storage_id)
    assert state is not None
    if not state.base_usable:
        return state.reset_reason or "no usable full backup to build on"
    before = {str(d["target"]): d["size_bytes"] for d in chain.disks}
    for target in sorted(disks.keys() - before.keys()):
        return f"disk {target} was added"
    for target in sorted(before.keys() - disks.keys()):
        return f"disk {target} was removed"
    for target in sorted(disks):
        if disks[target] != before[target]:
            return f"disk {target} was resized from {before[target]} to {disks[target]} bytes"
    if not chain.tip_checkpoint:
        return "the previous backup has no checkpoint"
    if chain.tip_checkpoint not in checkpoints:
        return f"checkpoint {chain.tip_checkpoint} is missing (VM redefined or migrated?)"
    return None


def decide(
    planned: str,
    planned_reset_reason: str | None,
    chain: Chain,
    backup_device: str,
    storage_id: uuid.UUID | None,
    disks: Mapping[str, int],
    checkpoints: Sequence[str],
    new_chain_id: uuid.UUID,
) -> Decision:
    """The job's last check: a planned incremental the chain can no longer take becomes a full
    of a new chain (`new_chain_id`), with the reason recorded."""
    if planned == "incremental":
        reason = why_not_incremental(chain, backup_device, storage_id, disks, checkpoints)
        if reason is None:
            assert chain.chain_id is not None
            return Decision("incremental", chain.tip_id, chain.chain_id, chain.tip_checkpoint, None)
        return Decision("full", None, new_chain_id, None, reason)
    return Decision("full", None, new_chain_id, None, planned_reset_reason)
