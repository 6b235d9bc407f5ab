"""The storage reconciliation on real files and a real catalog: orphans and unfinished uploads
go, everything referenced stays, missing files are marked and the API says what no longer
restores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.backups.service import list_statement, to_reads
from app.engine.chains import chain_states
from app.engine.storage_access import backup_prefix
from app.models import Backup, BackupChain, BackupFile, BackupStorage
from app.scheduling import FILES_MISSING
from tests.factories import create_backup, create_instance, create_user
from worker.jobs import Resources
from worker.tasks.reconcile import reconcile_all

Maker = async_sessionmaker[AsyncSession]
OLD = datetime.now(UTC) - timedelta(days=2)


def _write(root: Path, key: str, old: bool = True) -> Path:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"qcow2 bytes")
    if old:
        os.utime(path, (OLD.timestamp(), OLD.timestamp()))
    return path


async def test_reconcile_removes_orphans_keeps_the_referenced_and_marks_the_missing(
    real_sessionmaker: Maker, settings: object, tmp_path: Path
) -> None:
    root = tmp_path / "storage"
    root.mkdir()
    async with real_sessionmaker() as session:
        owner = await create_user(session)
        instance = await create_instance(session, owner)
        storage = BackupStorage(
            id=uuid.uuid4(), name="local-r", kind="local", config={"path": str(root)}
        )
        session.add(storage)
        await session.flush()
        chain = BackupChain(
            id=uuid.uuid4(),
            instance_id=instance.id,
            backup_device="primary",
            storage_id=storage.id,
        )
        session.add(chain)
        await session.flush()
        points = []
        for n, kind in enumerate(("full", "incremental", "incremental")):
            point = await create_backup(
                session,
                instance,
                type=kind,
                chain_id=chain.id,
                storage_id=storage.id,
                created_at=OLD + timedelta(hours=n),
            )
            key = f"{backup_prefix(instance.id, chain.id, point.id)}/vda.qcow2"
            session.add(
                BackupFile(
                    backup_id=point.id, disk_target="vda", object_key=key, size_bytes=11, sha256="0"
                )
            )
            points.append((point, key))
        await session.commit()
    full, middle, last = points
    for _point, key in (full, last):  # the middle point's file is gone
        _write(root, key)
        _write(root, key.replace("vda.qcow2", "manifest.json"))
    orphan = f"{instance.id}/{uuid.uuid4()}/{uuid.uuid4()}/vda.qcow2"
    young = f"{instance.id}/{uuid.uuid4()}/{uuid.uuid4()}/vda.qcow2"
    unfinished = f"{instance.id}/{uuid.uuid4()}/{uuid.uuid4()}/vda.qcow2.part-0123456789abcdef"
    for key, old in ((orphan, True), (young, False), (unfinished, True), ("notes.txt", True)):
        _write(root, key, old)
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    dry = subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", "reconcile", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "IBP_LOG_FORMAT": "json"},
    )
    assert dry.returncode == 0, dry.stderr
    # The command's log is on stderr, one JSON object per line (IBP_LOG_FORMAT).
    logged = [json.loads(line) for line in dry.stderr.splitlines()]
    assert any(line["message"].startswith("reconciled ") for line in logged), dry.stderr
    assert f"would delete orphan {orphan}" in dry.stdout
    assert f"backup {middle[0].id}: files missing" in dry.stdout
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == before

    res = Resources(settings, real_sessionmaker)  # type: ignore[arg-type]
    (result,) = await reconcile_all(res)
    assert not isinstance(result, str)
    assert result.deleted == [orphan] and result.discarded == [unfinished.split(".part-")[0]]
    assert result.missing == [middle[0].id]
    left = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert left == set(before) - {orphan, unfinished}

    async with real_sessionmaker() as session:
        rows = (await session.execute(list_statement(owner, instance_id=instance.id))).all()
        reads = {r.id: r for r in await to_reads(session, owner, rows)}
    assert reads[full[0].id].restorable and reads[full[0].id].files_missing_at is None
    assert not reads[middle[0].id].restorable and reads[middle[0].id].files_missing_at
    assert not reads[last[0].id].restorable  # it builds on the missing point
    async with real_sessionmaker() as session:
        assert (await session.get(Backup, last[0].id)) is not None
        # Nothing more builds on that chain: the next backup is a full, saying why.
        state = (await chain_states(session, [instance.id]))[instance.id].state
        assert state is not None and (state.base_usable, state.reset_reason) == (
            False,
            FILES_MISSING,
        )
