"""Plain async factories: each makes one row with sensible defaults, overridable by keyword."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.engine.webhooks.events import seal_secret
from app.engine.webhooks.signing import new_secret
from app.models import (
    ApiToken,
    Backup,
    BackupChain,
    BackupPolicy,
    Hypervisor,
    Instance,
    InstanceDisk,
    Location,
    Restore,
    User,
    WebhookEndpoint,
)
from app.policies.service import plan_next_run
from app.security import PERSONAL_PREFIX, SESSION_PREFIX, hash_password, new_token, token_digest
from app.values import WebhookEvent

_seq = itertools.count(1)
PASSWORD = "correct horse battery"
_PASSWORD_HASH = hash_password(PASSWORD)


async def _save(session: AsyncSession, row: Any) -> Any:
    session.add(row)
    await session.flush()
    return row


async def create_user(session: AsyncSession, **overrides: Any) -> User:
    n = next(_seq)
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "email": f"user{n}-{uuid.uuid4().hex[:6]}@example.com",
        "name": f"User {n}",
        "password_hash": _PASSWORD_HASH,
        "role": "user",
        "timezone": "UTC",
    }
    values.update(overrides)
    return await _save(session, User(**values))


async def create_admin(session: AsyncSession, **overrides: Any) -> User:
    return await create_user(session, role="admin", **overrides)


async def _token(
    session: AsyncSession, user: User, kind: str, name: str, **values: Any
) -> tuple[ApiToken, dict[str, str]]:
    token = new_token(PERSONAL_PREFIX if kind == "personal" else SESSION_PREFIX)
    values.setdefault("created_at", datetime.now(UTC))
    row = await _save(
        session,
        ApiToken(
            id=uuid.uuid4(),
            user_id=user.id,
            kind=kind,
            name=name,
            token_hash=token_digest(token),
            prefix=token[:12],
            **values,
        ),
    )
    return row, {"Authorization": f"Bearer {token}"}


async def auth_headers(session: AsyncSession, user: User) -> dict[str, str]:
    return (await _token(session, user, "personal", "test"))[1]


async def login_session(
    session: AsyncSession, user: User, age: timedelta = timedelta(0)
) -> tuple[ApiToken, dict[str, str]]:
    """A login session of the user, as POST /auth/login makes it, created `age` ago."""
    created_at = datetime.now(UTC) - age
    return await _token(
        session,
        user,
        "session",
        "login session",
        created_at=created_at,
        expires_at=created_at + timedelta(hours=12),
    )


async def create_location(session: AsyncSession, **overrides: Any) -> Location:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "name": f"loc-{uuid.uuid4().hex[:8]}",
        "backup_price_per_gb_month": None,
    }
    values.update(overrides)
    if isinstance(values["backup_price_per_gb_month"], str):
        values["backup_price_per_gb_month"] = Decimal(values["backup_price_per_gb_month"])
    return await _save(session, Location(**values))


async def create_hypervisor(session: AsyncSession, **overrides: Any) -> Hypervisor:
    if "location_id" not in overrides:
        overrides["location_id"] = (await create_location(session)).id
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "name": f"hv-{uuid.uuid4().hex[:8]}",
        "libvirt_uri": "qemu:///system",
        "max_concurrent_backups": 2,
        "scratch_dir": "/var/tmp/ibp-scratch",
    }
    values.update(overrides)
    return await _save(session, Hypervisor(**values))


async def create_instance(
    session: AsyncSession, owner: User, disks: list[dict[str, Any]] | None = None, **overrides: Any
) -> Instance:
    if "hypervisor_id" not in overrides:
        overrides["hypervisor_id"] = (await create_hypervisor(session)).id
    n = next(_seq)
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "name": f"vm-{n}",
        "owner_id": owner.id,
        "domain_name": f"dom-{uuid.uuid4().hex[:10]}",
        "status": "deployed",
    }
    values.update(overrides)
    disk_specs = (
        disks
        if disks is not None
        else [{"target": "vda", "boot": True, "size_bytes": 64 * 1024**2}]
    )
    instance = Instance(**values, disks=[InstanceDisk(id=uuid.uuid4(), **d) for d in disk_specs])
    return await _save(session, instance)


async def create_policy(session: AsyncSession, owner: User, **overrides: Any) -> BackupPolicy:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "owner_id": owner.id,
        "name": f"policy-{next(_seq)}",
        "frequency": "daily",
        "hour": 2,
        "day_of_week": None,
        "max_incremental_chain": 6,
        "retention_count": 3,
        "backup_device": "primary",
        "status": "active",
        "skipped_runs": 0,
    }
    values.update(overrides)
    # A test that makes a policy due at an instant gives next_run_at: the tick looks at it then.
    values.setdefault("next_check_at", values.get("next_run_at"))
    policy = BackupPolicy(**values)
    if "next_run_at" not in overrides:
        plan_next_run(policy, owner.timezone)
    return await _save(session, policy)


async def create_chain(session: AsyncSession, instance: Instance, **overrides: Any) -> BackupChain:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "instance_id": instance.id,
        "policy_id": instance.backup_policy_id,
        "backup_device": "primary",
        "disks": [],
    }
    values.update(overrides)
    return await _save(session, BackupChain(**values))


async def create_backup(session: AsyncSession, instance: Instance, **overrides: Any) -> Backup:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "instance_id": instance.id,
        "policy_id": instance.backup_policy_id,
        "type": "full",
        "status": "completed",
        "size_bytes": 1024**3,
        "scheduled_for": now,
        "created_at": now,
        "started_at": now,
        "completed_at": now,
    }
    values.update(overrides)
    return await _save(session, Backup(**values))


async def create_restore(session: AsyncSession, instance: Instance, **overrides: Any) -> Restore:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "instance_id": instance.id,
        "target": "new_disk",
        "status": "completed",
        "result": {},
        "created_at": datetime.now(UTC),
    }
    values.update(overrides)
    return await _save(session, Restore(**values))


async def create_webhook(
    session: AsyncSession, owner: User, secret: str | None = None, **overrides: Any
) -> WebhookEndpoint:
    """An enabled endpoint of `owner` for every event, signing with `secret` (or a new one)."""
    endpoint = WebhookEndpoint(
        id=uuid.uuid4(),
        owner_id=owner.id,
        url=overrides.pop("url", "http://127.0.0.1:9/hooks"),
        events=overrides.pop("events", [str(e) for e in WebhookEvent]),
        secret_encrypted=seal_secret(secret or new_secret()),
        **overrides,
    )
    saved: WebhookEndpoint = await _save(session, endpoint)
    return saved
