"""Can this backup be an incremental on the instance's chain, or must it start a new one?

Pure decisions from the catalog's chain state and what libvirt reports now (disks,
checkpoints); the backup job acts on them. Every "no" carries the reason an operator reads
as the backup's chain_reset_reason.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from app import virt
from app.engine.chains import DEVICE_CHANGED, InstanceChain
from app.models import Backup


@dataclass
class Decision:
    type: str
    parent_id: uuid.UUID | None
    chain_id: uuid.UUID
    incremental_from: str | None
    reset_reason: str | None


def disk_set(disks: list[virt.DiskInfo]) -> list[dict[str, object]]:
    return [{"target": d.target, "size_bytes": d.size_bytes} for d in disks]


def chain_change(chain: InstanceChain, backup: Backup, disks: list[virt.DiskInfo]) -> str | None:
    """Why the current chain cannot take an incremental, or None when it can."""
    if chain.state is None or chain.chain_id is None or chain.tip_id is None:
        return "no completed full backup to build on"
    if not chain.state.base_usable:
        return chain.state.reset_reason or "no usable full backup to build on"
    if chain.backup_device != backup.backup_device:
        return DEVICE_CHANGED
    before = {str(d["target"]): d["size_bytes"] for d in chain.disks}
    now = {d.target: d.size_bytes for d in disks}
    for target in sorted(now.keys() - before.keys()):
        return f"disk {target} was added"
    for target in sorted(before.keys() - now.keys()):
        return f"disk {target} was removed"
    for target in sorted(now):
        if now[target] != before[target]:
            return f"disk {target} was resized from {before[target]} to {now[target]} bytes"
    if not chain.tip_checkpoint:
        return "the previous backup has no checkpoint"
    return None


def decide(
    backup: Backup, chain: InstanceChain, disks: list[virt.DiskInfo], checkpoints: list[str]
) -> Decision:
    if backup.type == "incremental":
        reason = chain_change(chain, backup, disks)
        if reason is None and chain.tip_checkpoint not in checkpoints:
            reason = f"checkpoint {chain.tip_checkpoint} is missing (VM redefined or migrated?)"
        if reason is None:
            assert chain.chain_id is not None
            return Decision("incremental", chain.tip_id, chain.chain_id, chain.tip_checkpoint, None)
        return Decision("full", None, uuid.uuid4(), None, reason)
    return Decision("full", None, uuid.uuid4(), None, backup.chain_reset_reason)
