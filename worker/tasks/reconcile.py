"""Reconciling every backup storage with the catalog (app.engine.reconcile): a control-queue
cron job, and `ibp reconcile` for operators."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select

from app.engine.reconcile import SAFETY_WINDOW, Reconciliation, reconcile_storage
from app.engine.storage_access import open_driver
from app.errors import SecretsUndecryptable
from app.models import BackupStorage
from app.storage.base import StorageError
from worker.jobs import JobContext, Resources, now, resources

log = logging.getLogger(__name__)


async def reconcile_all(
    res: Resources, window: timedelta = SAFETY_WINDOW, dry_run: bool = False
) -> list[Reconciliation | str]:
    """Each storage in turn; one that cannot be reached is reported and the others still run."""
    async with res.session() as session:
        storages = list(await session.scalars(select(BackupStorage).order_by(BackupStorage.name)))
    results: list[Reconciliation | str] = []
    for storage in storages:
        try:
            async with res.session() as session:
                driver = await open_driver(session, storage.id)
                try:
                    results.append(
                        await reconcile_storage(session, storage, driver, now(), window, dry_run)
                    )
                finally:
                    await driver.close()
        except (StorageError, SecretsUndecryptable) as exc:
            log.warning("reconciling %s: %s", storage.name, exc)
            results.append(f"{storage.name}: not reconciled: {exc}")
    return results


async def reconcile_storages(ctx: JobContext) -> str:
    results = await reconcile_all(resources(ctx))
    return "; ".join(r if isinstance(r, str) else r.summary() for r in results)
