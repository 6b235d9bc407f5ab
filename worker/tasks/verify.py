"""The verify job, run on the instance's hypervisor: the backup's chain is fetched, every file's
sha256 checked against the catalog, each disk rebuilt and ``qemu-img check``-ed, then thrown away.

Runs in the job skeleton (worker.jobs) without a claim of its own: it only reads a completed
backup, and its outcome, good or bad, is the backup's verification.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app import virt
from app.engine.chain_fetch import ChainError, load_chain, rebuild, remove_tree
from app.engine.storage_access import open_driver
from app.engine.verification import record_verification
from app.engine.words import Words
from app.models import Backup, Hypervisor, Instance
from app.storage.base import StorageError
from app.values import BackupStatus
from worker.jobs import Job, Progress, Resources, describe, now


@dataclass
class Work:
    backup_id: uuid.UUID
    work_dir: Path


class VerifyJob(Job[Work]):
    model = Backup
    name = "verify"
    interrupted = "Could not verify: the worker stopped during the check"
    heartbeat = False  # the backup stays completed: nothing to keep alive

    async def claim(self, res: Resources, row_id: uuid.UUID, job_try: int) -> bool:
        async with res.session() as session:
            status = await session.scalar(select(Backup.status).where(Backup.id == row_id))
        return status == BackupStatus.COMPLETED

    async def fail(self, session: AsyncSession, row_id: uuid.UUID, words: Words) -> Any:
        # Not proven corrupt, but not proven good either: never leave it looking verified.
        if not words.user.startswith("Could not verify"):
            words = words.prefixed("Could not verify: ")
        await record_verification(session, row_id, now(), words)

    async def load(self, session: AsyncSession, row_id: uuid.UUID) -> Work:
        scratch_dir = await session.scalar(
            select(Hypervisor.scratch_dir)
            .join(Instance, Instance.hypervisor_id == Hypervisor.id)
            .join(Backup, Backup.instance_id == Instance.id)
            .where(Backup.id == row_id)
        )
        assert scratch_dir is not None
        work_dir = Path(scratch_dir) / f"verify-{row_id}-{secrets.token_hex(4)}"
        return Work(row_id, work_dir)

    async def execute(self, res: Resources, work: Work, progress: Progress) -> str:
        error: Words | None = None
        culprit: uuid.UUID | None = None
        try:
            async with res.session() as session:
                plan = await load_chain(session, work.backup_id)
                driver = await open_driver(session, plan.storage_id)
            try:
                outputs = {t: work.work_dir / "rebuilt" / f"{t}.qcow2" for t in plan.disks}
                await asyncio.to_thread(
                    (work.work_dir / "rebuilt").mkdir, parents=True, exist_ok=True
                )
                await rebuild(driver, plan, work.work_dir, outputs)
            finally:
                await driver.close()
        except ChainError as exc:
            error, culprit = Words(str(exc)), exc.backup_id
        except (StorageError, virt.VirtError, LookupError) as exc:
            error = describe(exc).prefixed("Could not verify: ")
        async with res.session() as session:
            await record_verification(session, work.backup_id, now(), error, culprit)
        return "ok" if error is None else f"failed: {error.operator or error.user}"

    async def cleanup(self, work: Work) -> None:
        await asyncio.to_thread(remove_tree, work.work_dir)


verify_backup = VerifyJob().run
