"""`ibp status`: every worker seen, and a non-zero exit naming a hypervisor nobody serves."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from app.engine.workers import GONE_AFTER, register
from app.models import Worker
from app.version import package_version
from tests.factories import (
    create_backup,
    create_hypervisor,
    create_instance,
    create_restore,
    create_user,
)


def _status() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", "status"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _line(out: str, first: str) -> list[str]:
    (line,) = [line for line in out.splitlines() if line.split()[0] == first]
    return line.split()


async def test_status_lists_every_worker_and_fails_naming_an_unserved_hypervisor(
    committed_engine: AsyncEngine,
) -> None:
    maker = async_sessionmaker(committed_engine, expire_on_commit=False)
    now = datetime.now(UTC)
    alive = lambda _: True  # noqa: E731  (no earlier process on these made-up hosts is dead)
    async with maker() as session:
        owner = await create_user(session)
        served = await create_hypervisor(session, name="hv-served")
        deserted = await create_hypervisor(session, name="hv-deserted")
        instance = await create_instance(session, owner, hypervisor_id=served.id)
        worker_id = await register(
            session, served.id, "host-a", 4101, now, alive, package_version()
        )
        await register(session, None, "host-c", 4103, now, alive, package_version())
        # The deserted hypervisor's worker was last seen long ago (it never said goodbye).
        await register(session, deserted.id, "host-b", 4102, now - 3 * GONE_AFTER, alive, "0.0.9")
        await create_backup(
            session, instance, status="in_progress", completed_at=None, worker_id=worker_id
        )
        await create_restore(session, instance, status="in_progress", worker_id=worker_id)
        await session.commit()

    done = _status()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == "ibp status: hypervisor hv-deserted has no live worker"
    header = done.stdout.splitlines()[0].split()
    assert header[:3] == ["WORKER", "HOST", "PID"]
    served_row = _line(done.stdout, "hv-served")
    assert served_row[1:3] == ["host-a", "4101"]
    assert served_row[-3:] == ["2", package_version(), "live"]  # a backup and a restore
    assert _line(done.stdout, "control")[1:3] == ["host-c", "4103"]
    deserted_row = _line(done.stdout, "hv-deserted")
    assert deserted_row[3] == "6m" and deserted_row[5] == "ago"  # 3 x 2 min ago
    assert deserted_row[-3:] == ["0", "0.0.9", "gone"]

    # A new worker for it: every hypervisor is served, status says so with 0.
    async with maker() as session:
        await register(session, deserted.id, "host-b", 4104, now, alive, package_version())
        await session.execute(update(Worker).where(Worker.pid == 4102).values(stopped_at=now))
        await session.commit()
    done = _status()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    states = [line.split()[-1] for line in done.stdout.splitlines()[1:]]
    assert sorted(states) == ["live", "live", "live", "stopped"]


async def test_status_with_no_worker_and_no_hypervisor_is_fine(
    committed_engine: AsyncEngine,
) -> None:
    done = _status()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "No worker has been seen."
