"""The verify job, run on the instance's hypervisor: the backup's chain is fetched, every file's
sha256 checked against the catalog, each disk rebuilt and ``qemu-img check``-ed, then thrown away.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from datetime import UTC, datetime
from pathlib import Path

from app import virt
from app.engine.chain_fetch import ChainError, load_chain, rebuild, remove_tree
from app.engine.storage_access import open_driver
from app.engine.verification import record_verification
from app.models import Backup, Hypervisor, Instance
from app.storage.base import StorageError
from worker.context import WorkerContext
from worker.tasks.backup import describe

log = logging.getLogger(__name__)


async def verify_backup(ctx: WorkerContext, backup_id: str) -> str:
    bid = uuid.UUID(backup_id)
    async with ctx["sessionmaker"]() as session:
        backup = await session.get(Backup, bid)
        if backup is None or backup.status != "completed":
            return "not completed"
        instance = await session.get(Instance, backup.instance_id)
        assert instance is not None
        hypervisor = await session.get(Hypervisor, instance.hypervisor_id)
        assert hypervisor is not None
        try:
            plan = await load_chain(session, bid)
        except ChainError as exc:
            await record_verification(session, bid, datetime.now(UTC), str(exc), exc.backup_id)
            await session.commit()
            return f"failed: {exc}"
    work_dir = Path(hypervisor.scratch_dir) / f"verify-{bid}-{secrets.token_hex(4)}"
    error: str | None = None
    culprit: uuid.UUID | None = None
    try:
        async with ctx["sessionmaker"]() as session:
            driver = await open_driver(session, plan.storage_id)
        try:
            outputs = {t: work_dir / "rebuilt" / f"{t}.qcow2" for t in plan.disks}
            await asyncio.to_thread((work_dir / "rebuilt").mkdir, parents=True, exist_ok=True)
            await rebuild(driver, plan, work_dir, outputs)
        finally:
            await driver.close()
    except ChainError as exc:
        error, culprit = str(exc), exc.backup_id
    except (StorageError, virt.VirtError, LookupError) as exc:
        # Not proven corrupt, but not proven good either: never leave it looking verified.
        error = f"Could not verify: {describe(exc)}"
    finally:
        await asyncio.to_thread(remove_tree, work_dir)
    async with ctx["sessionmaker"]() as session:
        await record_verification(session, bid, datetime.now(UTC), error, culprit)
        await session.commit()
    return "ok" if error is None else f"failed: {error}"
