"""Storage checks, run on a hypervisor's worker: from where backups reach the storage, never
from the API host, and bounded in time."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime

from sqlalchemy import update

from app.engine.storage_access import driver_config
from app.errors import SecretsUndecryptable
from app.metrics import STORAGE_CHECKS
from app.models import BackupStorage
from app.storage.base import CheckResult, run_check
from app.storage.registry import get_driver
from app.values import StorageStatus
from worker.jobs import JobContext, resources

log = logging.getLogger(__name__)
CHECK_TIMEOUT_S = 20.0


async def check_storage(ctx: JobContext, storage_id: str) -> str:
    """Check the storage as it is configured now, and record the outcome on its row unless
    the row changed meanwhile (an update sets it back to `unknown`: this result would
    describe a config that is gone)."""
    res, sid = resources(ctx), uuid.UUID(storage_id)
    async with res.session() as session:
        storage = await session.get(BackupStorage, sid)
        if storage is None or storage.status != StorageStatus.CHECKING:
            return "not checking"
        kind, config, sealed = storage.kind, dict(storage.config), storage.secrets_encrypted
        try:
            full_config: dict[str, object] | str = driver_config(storage)
        except SecretsUndecryptable as exc:
            full_config = exc.detail
    if isinstance(full_config, str):  # the secrets do not open: nothing to connect with
        result = CheckResult(False, None, None, full_config)
    else:
        result = await _check(kind, full_config)
    if result.detail:
        log.info("storage %s check failed: %s", storage_id, result.detail)
    async with res.session() as session:
        await session.execute(
            update(BackupStorage)
            .where(
                BackupStorage.id == sid,
                BackupStorage.status == StorageStatus.CHECKING,
                BackupStorage.config == config,
                BackupStorage.secrets_encrypted.is_not_distinct_from(sealed),
            )
            .values(
                status=StorageStatus.OK if result.ok else StorageStatus.ERROR,
                last_error=result.error,
                last_checked_at=datetime.now(UTC),
            )
        )
    STORAGE_CHECKS.labels(kind=kind, result="ok" if result.ok else "error").inc()
    return "ok" if result.ok else f"failed: {result.error}"


async def _check(kind: str, config: dict[str, object]) -> CheckResult:
    try:
        driver = get_driver(kind, config)
    except ValueError as exc:  # a config the driver refuses: its words name fields, not hosts
        return CheckResult(False, None, None, f"the storage configuration is refused: {exc}")
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            return await run_check(driver)
    except TimeoutError:
        return CheckResult(
            False, None, None, f"the storage did not answer within {CHECK_TIMEOUT_S:.0f} s"
        )
    finally:
        await driver.close()
