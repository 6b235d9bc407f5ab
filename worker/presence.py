"""This worker process in the `workers` table, and the recovery of what a dead one left.

A hypervisor's worker that starts cleans up at once what an earlier worker on the hypervisor
left: rows in progress whose worker is gone are failed with the true reason after their
libvirt job, checkpoint, work files and partial uploads are removed; then libvirt backup jobs,
checkpoints and scratch files no live job owns go too. While it runs it does the same for rows
whose worker vanished since (another process on the same hypervisor), every RECOVER_EVERY_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app import virt
from app.engine import workers
from app.models import Backup, Hypervisor, Instance, Restore
from app.values import BackupStatus
from app.version import package_version
from worker.jobs import Job, Resources, now, until_recorded
from worker.tasks.backup import BackupJob
from worker.tasks.restore import RestoreJob

log = logging.getLogger(__name__)
RECOVER_EVERY_S = 30.0
# Work files of a job: "ibp-<backup id>-<disk>.qcow2", "restore-<restore id>" and
# "verify-<backup id>-<hex>" (a verification has no row in progress: one left at a start is a
# dead worker's; a hypervisor has one worker).
_WORK_FILE = re.compile(r"^(?:ibp|restore|verify)-([0-9a-f-]{36})")
JOBS: tuple[Job[Any], ...] = (BackupJob(), RestoreJob())


def process_alive(pid: int) -> bool:
    """Whether an earlier worker's process (on this host) still runs. Our own pid is an
    earlier life of this one (a container restarted with the same pid)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def register(res: Resources, hypervisor_id: uuid.UUID | None) -> uuid.UUID:
    async with res.session() as session:
        return await workers.register(
            session,
            hypervisor_id,
            socket.gethostname(),
            os.getpid(),
            now(),
            process_alive,
            package_version(),
        )


async def unregister(res: Resources, worker_id: uuid.UUID) -> None:
    with contextlib.suppress(Exception):  # a worker that cannot say goodbye is noticed anyway
        async with res.session() as session:
            await workers.stop(session, worker_id, now())


async def keep_present(res: Resources, worker_id: uuid.UUID, hypervisor: Hypervisor | None) -> None:
    """Until cancelled: the worker's heartbeat, and on a hypervisor the recovery of orphans.
    A failed round (the database restarting) is logged; the next one tries again."""
    since_recovery = 0.0
    while True:
        await asyncio.sleep(workers.BEAT_S)
        since_recovery += workers.BEAT_S
        try:
            async with res.session() as session:
                await workers.beat(session, worker_id, now())
            if hypervisor is not None and since_recovery >= RECOVER_EVERY_S:
                since_recovery = 0.0
                await recover_orphans(res, hypervisor)
        except Exception as exc:
            log.warning("worker heartbeat failed (%s); retrying", exc)


async def recover_orphans(res: Resources, hypervisor: Hypervisor) -> int:
    """Fail and clean up the hypervisor's rows in progress whose worker is gone."""
    recovered = 0
    for job in JOBS:
        async with res.session() as session:
            ids = await workers.orphaned(session, job.model, hypervisor.id, now())
        for row_id in ids:
            if await job.abandon_orphan(res, row_id):  # it logs, with the job's ids
                recovered += 1
    return recovered


async def recover_hypervisor(res: Resources, hypervisor: Hypervisor) -> int:
    """At a hypervisor worker's start: orphaned rows first, then whatever is left on the
    hypervisor that no running job owns. Returns the rows recovered."""
    recovered = await until_recorded(
        "recovering orphaned jobs", lambda: recover_orphans(res, hypervisor)
    )
    async with res.session() as session:
        instances = (
            await session.execute(
                select(Instance.id, Instance.domain_name).where(
                    Instance.hypervisor_id == hypervisor.id
                )
            )
        ).all()
        ids = [i for i, _ in instances]
        running: set[uuid.UUID] = set()
        busy: set[uuid.UUID] = set()
        for model in (Backup, Restore):
            for row_id, instance_id in await session.execute(
                select(model.id, model.instance_id).where(
                    model.instance_id.in_(ids), model.status == BackupStatus.IN_PROGRESS
                )
            ):
                running.add(row_id)
                busy.add(instance_id)
        kept = set(
            await session.scalars(
                select(Backup.checkpoint_name).where(
                    Backup.instance_id.in_(ids),
                    Backup.status == BackupStatus.COMPLETED,
                    Backup.checkpoint_name.is_not(None),
                )
            )
        )
    for instance_id, domain in instances:
        if instance_id not in busy:
            await asyncio.to_thread(_tidy_domain, hypervisor.libvirt_uri, domain, kept)
    await asyncio.to_thread(_tidy_scratch, Path(hypervisor.scratch_dir), running)
    return recovered


def _tidy_domain(uri: str, domain: str, kept: set[str | None]) -> None:
    """No backup job runs for the domain here: abort one that does, drop checkpoints of
    backups that never completed (each would slow the guest's writes)."""
    try:
        if virt.abort_job(uri, domain):
            log.warning("aborted a backup job of %s that no running job owned", domain)
        for name in virt.list_checkpoints(uri, domain):
            if name.startswith("ibp-") and name not in kept:
                virt.delete_checkpoint(uri, domain, name)
                log.warning("deleted checkpoint %s of %s: its backup never completed", name, domain)
    except virt.VirtError as exc:  # a domain gone or shut off has nothing running
        log.debug("tidying %s: %s", domain, exc)


def _tidy_scratch(scratch: Path, running: set[uuid.UUID]) -> None:
    if not scratch.is_dir():
        return
    for path in scratch.iterdir():
        match = _WORK_FILE.match(path.name)
        if match is None or uuid.UUID(match.group(1)) in running:
            continue
        log.warning("removing %s: no running job owns it", path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
