"""Which chains retention deletes. Pure code."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class ChainInfo:
    """One chain of an instance: ``id`` is opaque (hashable), ``full_completed`` says whether
    its full backup completed (only such chains are counted or deleted here)."""

    id: Any
    started_at: datetime
    full_completed: bool


def chains_to_delete(
    chains: Sequence[ChainInfo], retention_count: int, current_chain_id: Any | None
) -> list[Any]:
    """Ids of the oldest completed chains beyond ``retention_count``, oldest first.

    Call it after a new full has completed (so the newest completed chain is the new one).
    Only chains whose full completed are counted and can be returned; chains whose full
    failed or is still running never push a good chain out and are left alone. The current
    chain (the one being written) is never returned.
    Chains are ordered by ``started_at``; equal times keep the input order.
    """
    if retention_count < 1:
        raise ValueError("retention_count must be at least 1")
    completed = sorted((c for c in chains if c.full_completed), key=lambda c: c.started_at)
    excess = len(completed) - retention_count
    if excess <= 0:
        return []
    doomed: list[Any] = []
    for c in completed[:excess]:
        if current_chain_id is not None and c.id == current_chain_id:
            continue
        doomed.append(c.id)
    return doomed
