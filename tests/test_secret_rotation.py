"""Secret-key rotation: IBP_PREVIOUS_SECRET_KEYS still open old secrets, new ones are sealed with
IBP_SECRET_KEY, and `ibp rotate-secrets` moves every storage's secrets to it (or names the
storages no key opens, changes nothing and exits 1)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.security import SecretBox, WrongSecretKey

OLD = "old-secret-key-that-sealed-the-storages-first"
NEW = "new-secret-key-that-every-secret-moves-to-now"
WRONG = "a-key-that-never-sealed-anything-in-this-test"
SECRETS = {"password": "hunter2-marker"}


def test_previous_keys_open_old_secrets_and_new_ones_are_sealed_with_the_current_key() -> None:
    sealed_with_old = SecretBox(OLD).encrypt(SECRETS)
    rotating = SecretBox(NEW, (OLD,))
    assert rotating.decrypt(sealed_with_old) == SECRETS

    sealed_now = rotating.encrypt(SECRETS)
    assert SecretBox(NEW).decrypt(sealed_now) == SECRETS
    with pytest.raises(WrongSecretKey):
        SecretBox(OLD).decrypt(sealed_now)


def test_reseal_moves_a_blob_to_the_current_key() -> None:
    resealed = SecretBox(NEW, (OLD,)).reseal(SecretBox(OLD).encrypt(SECRETS))
    assert SecretBox(NEW).decrypt(resealed) == SECRETS
    with pytest.raises(WrongSecretKey):
        SecretBox(NEW).reseal(SecretBox(WRONG).encrypt(SECRETS))


def test_previous_keys_are_read_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IBP_PREVIOUS_SECRET_KEYS", f" {OLD}, {WRONG} ,")
    assert Settings().previous_secret_keys == [OLD, WRONG]
    monkeypatch.setenv("IBP_PREVIOUS_SECRET_KEYS", "")
    assert Settings().previous_secret_keys == []


def _rotate(secret_key: str, previous: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IBP_SECRET_KEY": secret_key, "IBP_PREVIOUS_SECRET_KEYS": previous}
    return subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", "rotate-secrets"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def _sealed(engine: AsyncEngine) -> dict[str, str | None]:
    from app.models import BackupStorage

    async with engine.connect() as conn:
        rows = await conn.execute(select(BackupStorage.name, BackupStorage.secrets_encrypted))
    return {name: sealed for name, sealed in rows}


async def test_rotate_secrets_reseals_every_storage_with_the_current_key(
    committed_engine: AsyncEngine,
) -> None:
    from app.models import BackupStorage

    old = SecretBox(OLD)
    async with committed_engine.begin() as conn:
        await conn.execute(
            insert(BackupStorage),
            [
                {"id": uuid.uuid4(), "name": name, "kind": kind, "config": config,
                 "secrets_encrypted": sealed, "status": "unknown"}
                for name, kind, config, sealed in [
                    ("sftp-a", "sftp", {"host": "a"}, old.encrypt(SECRETS)),
                    ("s3-b", "s3", {"bucket": "b"}, old.encrypt({"secret_access_key": "x"})),
                    ("local-c", "local", {"path": "/srv/backups"}, None),
                ]
            ],
        )  # fmt: skip

    # The old key is gone and not named as previous: nothing opens, nothing changes, exit 1.
    before = await _sealed(committed_engine)
    refused = _rotate(WRONG)
    assert refused.returncode == 1, refused.stderr
    assert "Traceback" not in refused.stderr
    assert "'sftp-a'" in refused.stderr and "'s3-b'" in refused.stderr
    assert "'local-c'" not in refused.stderr
    assert "IBP_PREVIOUS_SECRET_KEYS" in refused.stderr
    assert await _sealed(committed_engine) == before

    done = _rotate(NEW, previous=OLD)
    assert done.returncode == 0, done.stderr
    assert "2 backup storage(s)" in done.stdout
    after = await _sealed(committed_engine)
    assert after["local-c"] is None
    assert SecretBox(NEW).decrypt(after["sftp-a"]) == SECRETS
    assert SecretBox(NEW).decrypt(after["s3-b"]) == {"secret_access_key": "x"}

    # The previous key can now be dropped: a second run needs only the current one.
    again = _rotate(NEW)
    assert again.returncode == 0, again.stderr
    with pytest.raises(WrongSecretKey):
        SecretBox(OLD).decrypt(after["sftp-a"])


async def test_rotate_secrets_reseals_webhook_signing_secrets_too(
    committed_engine: AsyncEngine,
) -> None:
    from app.models import User, WebhookEndpoint

    user_id, hook_id = uuid.uuid4(), uuid.uuid4()
    async with committed_engine.begin() as conn:
        await conn.execute(
            insert(User).values(
                id=user_id,
                email="hooks@example.com",
                name="",
                password_hash="x",
                role="user",
                timezone="UTC",
            )
        )
        await conn.execute(
            insert(WebhookEndpoint).values(
                id=hook_id, owner_id=user_id, all_users=False, url="http://example.com/h",
                description="", events=["backup.failed"], enabled=True,
                secret_encrypted=SecretBox(OLD).encrypt({"secret": "whsec_marker"}),
            )
        )  # fmt: skip

    async def sealed() -> str:
        async with committed_engine.connect() as conn:
            return str(await conn.scalar(select(WebhookEndpoint.secret_encrypted)))

    before = await sealed()
    refused = _rotate(WRONG)
    assert refused.returncode == 1, refused.stderr
    assert str(hook_id) in refused.stderr and "Traceback" not in refused.stderr
    assert await sealed() == before

    done = _rotate(NEW, previous=OLD)
    assert done.returncode == 0, done.stderr
    assert "1 webhook endpoint(s)" in done.stdout
    assert SecretBox(NEW).decrypt(await sealed()) == {"secret": "whsec_marker"}
