"""The next runs of a policy, with what each would be (full or incremental)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.engine.chains import chain_states
from app.errors import Unprocessable
from app.models import Hypervisor, Instance, User
from app.policies.schemas import SchedulePreviewRun
from app.policies.service import get_policy_row
from app.scheduling import ChainState, next_run_at, plan_backup, resolve_zone

MAX_SCAN_FACTOR = 8  # a weekly chain-full policy skips up to 6 days of every 7


async def schedule_preview(
    session: AsyncSession,
    user: User,
    policy_id: uuid.UUID,
    count: int,
    instance_id: uuid.UUID | None,
) -> list[SchedulePreviewRun]:
    policy, zone_name = await get_policy_row(session, user, policy_id)
    state: ChainState | None = None
    if instance_id is not None:
        attached = await session.scalar(
            select(Instance.id).where(
                Instance.id == instance_id, Instance.backup_policy_id == policy.id
            )
        )
        if attached is None:
            raise Unprocessable(
                "instance_id: the instance is not attached to this policy",
                errors=[
                    {
                        "field": "instance_id",
                        "message": "the instance is not attached to this policy",
                        "type": "not_attached",
                    }
                ],
            )
        chain = (await chain_states(session, [instance_id]))[instance_id]
        storage_id = await session.scalar(
            select(Hypervisor.backup_storage_id)
            .join(Instance, Instance.hypervisor_id == Hypervisor.id)
            .where(Instance.id == instance_id)
        )
        state = chain.planning_state(policy.backup_device, storage_id)
    schedule, zone = policy.schedule, resolve_zone(zone_name)
    runs: list[SchedulePreviewRun] = []
    cursor = datetime.now(UTC)
    for _ in range(count * MAX_SCAN_FACTOR):
        if len(runs) == count:
            break
        cursor = next_run_at(schedule, zone, cursor)
        local = cursor.astimezone(zone)
        plan = plan_backup(schedule, policy.max_incremental_chain, state, local.date())
        if plan.kind == "skip":
            continue
        runs.append(SchedulePreviewRun(at=cursor, local_time=local, type=plan.kind))
        if plan.kind == "full":
            state = ChainState(0, True)
        else:
            assert state is not None
            state = ChainState(state.incrementals + 1, True)
    return runs
