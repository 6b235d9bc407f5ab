"""Pure scheduling rules: run instants, full/incremental planning and retention choice.

No I/O here: everything is a function of its arguments (property-tested in
``tests/scheduling``).
"""

from app.scheduling.plan import (
    DEVICE_CHANGED,
    FILES_MISSING,
    FULL_FAILED,
    NO_POLICY,
    RESTORED,
    STORAGE_CHANGED,
    Chain,
    ChainState,
    Decision,
    Plan,
    PlanKind,
    decide,
    plan_backup,
    plan_now,
    why_not_incremental,
)
from app.scheduling.retention import ChainInfo, chains_to_delete
from app.scheduling.schedule import (
    FREQUENCIES,
    WEEKDAYS,
    Schedule,
    format_hour,
    is_full_day,
    local_weekday,
    schedule_summary,
)
from app.scheduling.sentence import backup_weekdays, clock_change_notes, schedule_sentence
from app.scheduling.times import (
    ZoneLike,
    missed_slot_action,
    next_run_at,
    resolve_zone,
    run_on_local_date,
    slot_local_date,
)
from app.scheduling.upcoming import (
    longest_gap_days,
    next_backup_at,
    state_after,
    steady_state,
)
from app.values import Frequency, Weekday

__all__ = [
    "DEVICE_CHANGED",
    "FILES_MISSING",
    "FREQUENCIES",
    "FULL_FAILED",
    "NO_POLICY",
    "RESTORED",
    "STORAGE_CHANGED",
    "WEEKDAYS",
    "Chain",
    "ChainInfo",
    "ChainState",
    "Decision",
    "Frequency",
    "Plan",
    "PlanKind",
    "Schedule",
    "Weekday",
    "ZoneLike",
    "backup_weekdays",
    "chains_to_delete",
    "clock_change_notes",
    "decide",
    "format_hour",
    "is_full_day",
    "local_weekday",
    "longest_gap_days",
    "missed_slot_action",
    "next_backup_at",
    "next_run_at",
    "plan_backup",
    "plan_now",
    "resolve_zone",
    "run_on_local_date",
    "schedule_sentence",
    "schedule_summary",
    "slot_local_date",
    "state_after",
    "steady_state",
    "why_not_incremental",
]
