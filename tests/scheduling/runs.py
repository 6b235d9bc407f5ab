"""The next runs of a schedule, as the tests list them."""

from __future__ import annotations

from datetime import datetime

from app.scheduling import Schedule, ZoneLike, next_run_at, resolve_zone


def upcoming_runs(
    schedule: Schedule, zone: ZoneLike, after: datetime, count: int
) -> list[datetime]:
    """The next ``count`` runs strictly after ``after``, oldest first (UTC)."""
    if count < 0:
        raise ValueError("count must not be negative")
    z = resolve_zone(zone)
    runs: list[datetime] = []
    cursor = after
    for _ in range(count):
        cursor = next_run_at(schedule, z, cursor)
        runs.append(cursor)
    return runs
