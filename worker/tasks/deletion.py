"""Removing a backup's stored files, then its rows. Unreachable storage: retry with backoff."""

from __future__ import annotations

import logging
import uuid

from arq import Retry
from sqlalchemy import delete, func, select

from app.engine.lifecycle import remove_instance_when_emptied
from app.engine.storage_access import backup_prefix, open_driver
from app.errors import SecretsUndecryptable
from app.logs import job_context
from app.models import Backup, BackupChain, BackupFile
from app.storage.base import StorageError
from app.values import BackupStatus
from worker.jobs import JobContext, job_log_ids, resources

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 3600


async def delete_backup_files(ctx: JobContext, backup_id: str) -> str:
    async with resources(ctx).sessionmaker() as session:
        ids = await job_log_ids(session, "delete", Backup, uuid.UUID(backup_id))
    with job_context(**ids):
        return await _delete(ctx, backup_id)


async def _delete(ctx: JobContext, backup_id: str) -> str:
    async with resources(ctx).sessionmaker() as session:
        backup = await session.scalar(
            select(Backup).where(Backup.id == uuid.UUID(backup_id)).with_for_update()
        )
        if backup is None:
            return "gone"
        if backup.status != BackupStatus.DELETING:
            return f"not deleting ({backup.status})"
        instance_id = backup.instance_id
        files = list(
            await session.scalars(select(BackupFile).where(BackupFile.backup_id == backup.id))
        )
        chain = await session.get(BackupChain, backup.chain_id) if backup.chain_id else None
        storage_id = backup.storage_id or (chain.storage_id if chain else None)
        if storage_id is not None:
            try:
                driver = await open_driver(session, storage_id)
                try:
                    for f in files:
                        await driver.delete(f.object_key)
                    if chain is not None:
                        prefix = backup_prefix(backup.instance_id, chain.id, backup.id)
                        await driver.delete(f"{prefix}/manifest.json")
                finally:
                    await driver.close()
            except (StorageError, OSError, SecretsUndecryptable) as exc:
                backup.delete_attempts += 1
                backup.delete_error = (
                    exc.detail
                    if isinstance(exc, SecretsUndecryptable)
                    else f"Backup storage is unreachable: {exc}"
                )
                await session.commit()
                defer = min(MAX_BACKOFF_S, 10 * 2 ** min(backup.delete_attempts, 12))
                log.warning("deleting backup %s failed (%s); retry in %ss", backup_id, exc, defer)
                raise Retry(defer=defer) from exc
        await session.execute(delete(Backup).where(Backup.id == backup.id))
        if chain is not None:
            left = await session.scalar(
                select(func.count()).select_from(Backup).where(Backup.chain_id == chain.id)
            )
            if not left:
                await session.delete(chain)
        await session.commit()
    log.info("backup %s deleted with its %d stored file(s)", backup_id, len(files))
    # Only once this removal is committed: the job removing the last backup then sees none.
    async with resources(ctx).session() as session:
        if await remove_instance_when_emptied(session, instance_id):
            log.info("instance %s deleted with its last backup", instance_id)
    return "deleted"
