"""The safety net: each backup storage compared with the catalog.

Whatever a crash, a lost database write or a failed abort left behind is found here, on the
storage itself: objects in the service's layout (<instance>/<chain>/<backup>/...) that no
catalog row claims are deleted once older than a safety window, unfinished uploads of that age
are discarded, and backups whose files are gone are marked (the API then says their chain
cannot be restored from them on). Nothing the catalog references is ever deleted, nor anything
of a backup still queued or running, nor anything outside the layout.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.engine.policy_state import refresh_policies_of
from app.engine.storage_access import backup_prefix
from app.models import Backup, BackupChain, BackupFile, BackupStorage, Instance
from app.storage.base import BackupStorageDriver
from app.values import ACTIVE, BackupStatus

log = logging.getLogger(__name__)
SAFETY_WINDOW = timedelta(hours=24)  # longer than any job may write before it is recorded
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_LAYOUT = re.compile(rf"^({_UUID})/({_UUID})/({_UUID})/[^/]+$")


@dataclass
class Reconciliation:
    storage: str
    deleted: list[str] = field(default_factory=list)  # orphaned objects
    discarded: list[str] = field(default_factory=list)  # unfinished uploads
    missing: list[uuid.UUID] = field(default_factory=list)  # backups with a file gone
    found_again: list[uuid.UUID] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.storage}: {len(self.deleted)} orphaned object(s) deleted, "
            f"{len(self.discarded)} unfinished upload(s) discarded, "
            f"{len(self.missing)} backup(s) with missing files, "
            f"{len(self.found_again)} found again"
        )


def _backup_of(key: str) -> uuid.UUID | None:
    match = _LAYOUT.match(key)
    return uuid.UUID(match.group(3)) if match else None


async def reconcile_storage(
    session: AsyncSession,
    storage: BackupStorage,
    driver: BackupStorageDriver,
    now: datetime,
    window: timedelta = SAFETY_WINDOW,
    dry_run: bool = False,
) -> Reconciliation:
    """Compare one storage with the catalog and (unless `dry_run`) act on the difference.
    The caller commits."""
    result = Reconciliation(storage.name)
    on_storage = or_(
        Backup.storage_id == storage.id,
        Backup.chain_id.in_(select(BackupChain.id).where(BackupChain.storage_id == storage.id)),
    )
    # Every backup of any state keeps its objects here: the deletion job owns deletions, and
    # a failed one's files were removed by its job (or are orphans once it is gone).
    backups = {
        row.id: row
        for row in (
            await session.execute(
                select(
                    Backup.id,
                    Backup.instance_id,
                    Backup.chain_id,
                    Backup.status,
                    Backup.files_missing_at,
                ).where(on_storage | Backup.status.in_(ACTIVE))
            )
        ).all()
    }
    claimed: dict[str, uuid.UUID] = {}
    for backup_id, key in await session.execute(
        select(BackupFile.backup_id, BackupFile.object_key).where(
            BackupFile.backup_id.in_(list(backups))
        )
    ):
        claimed[key] = backup_id
    for row in backups.values():
        if row.chain_id is not None:
            claimed[f"{backup_prefix(row.instance_id, row.chain_id, row.id)}/manifest.json"] = (
                row.id
            )
    cutoff = now - window
    present: set[str] = set()
    for found in await driver.list(""):
        present.add(found.key)
        owner = _backup_of(found.key)
        if owner is None or found.key in claimed or owner in backups:
            continue
        if found.modified is None or found.modified > cutoff:
            continue
        result.deleted.append(found.key)
        if not dry_run:
            await driver.delete(found.key)
    for upload in await driver.partial_uploads(""):
        owner = _backup_of(upload.key)
        if owner is None or (owner in backups and backups[owner].status in ACTIVE):
            continue
        if upload.started is not None and upload.started > cutoff:
            continue
        result.discarded.append(upload.key)
        if not dry_run:
            await driver.discard(upload)
    gone = {claimed[key] for key in claimed if key not in present}
    for backup_id, row in backups.items():
        if row.status != BackupStatus.COMPLETED:
            continue
        if backup_id in gone and row.files_missing_at is None:
            result.missing.append(backup_id)
        elif backup_id not in gone and row.files_missing_at is not None:
            result.found_again.append(backup_id)
    if not dry_run:
        if result.missing:
            await session.execute(
                update(Backup).where(Backup.id.in_(result.missing)).values(files_missing_at=now)
            )
        if result.found_again:
            await session.execute(
                update(Backup)
                .where(Backup.id.in_(result.found_again))
                .values(files_missing_at=None)
            )
        if result.missing or result.found_again:  # a chain broken, or whole again
            changed = [*result.missing, *result.found_again]
            await refresh_policies_of(
                session,
                Instance.id.in_(select(Backup.instance_id).where(Backup.id.in_(changed))),
                now,
            )
    log.info("reconciled %s%s", result.summary(), " (dry run)" if dry_run else "")
    return result
