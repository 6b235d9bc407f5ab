"""One behaviour contract, run against every driver on a real server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime

import pytest

from app.storage import BackupStorageDriver, ObjectNotFound, PartialUpload, PutResult
from tests.storage.conftest import Backend
from tests.storage.payloads import MiB, chunked, failing, payload, read_all, sha256


def leftovers(backend: Backend, marker: str) -> list[str]:
    return [name for name in backend.stored_names() if marker in name]


async def test_multi_part_object_round_trips_with_matching_sha256(
    backend: Backend, driver: BackupStorageDriver, uid: str
) -> None:
    data = payload(11 * MiB + 123, seed=1)  # more than two 5 MiB S3 parts
    key = f"{uid}/chain-1/backup-1/vda.qcow2"

    result = await driver.put(key, chunked(data))

    assert result == PutResult(size=len(data), sha256=sha256(data))
    assert sha256(await read_all(driver, key)) == sha256(data)
    info = await driver.stat(key)
    assert (info.key, info.size) == (key, len(data))
    assert isinstance(info.modified, datetime)


@pytest.mark.parametrize("size", [0, 3 * MiB, 17 * MiB + 3])
async def test_put_with_the_size_known_stores_exactly_the_stream(
    driver: BackupStorageDriver, uid: str, size: int
) -> None:
    # A backup's image is streamed with its size known up front (S3 picks its part size from
    # it): empty, smaller than one part, and several parts plus a tail.
    data = payload(size, seed=11)
    key = f"{uid}/c/b/vda.qcow2"

    result = await driver.put(key, chunked(data), size=size)

    assert result == PutResult(size=size, sha256=sha256(data))
    assert await read_all(driver, key) == data
    assert (await driver.stat(key)).size == size


async def test_local_path_is_none_or_a_file_with_the_objects_bytes(
    backend: Backend, driver: BackupStorageDriver, uid: str
) -> None:
    data = payload(3 * MiB + 5, seed=12)
    await driver.put(f"{uid}/c/b/vda.qcow2", chunked(data))

    path = await driver.local_path(f"{uid}/c/b/vda.qcow2")

    assert path is None or path.read_bytes() == data
    assert (path is not None) == (backend.kind in ("local", "nfs"))


async def test_empty_object_round_trips(driver: BackupStorageDriver, uid: str) -> None:
    result = await driver.put(f"{uid}/empty", chunked(b""))

    assert result == PutResult(0, sha256(b""))
    assert await read_all(driver, f"{uid}/empty") == b""
    assert (await driver.stat(f"{uid}/empty")).size == 0


async def test_put_replaces_an_existing_object(driver: BackupStorageDriver, uid: str) -> None:
    await driver.put(f"{uid}/f", chunked(b"old contents, longer than the new"))
    await driver.put(f"{uid}/f", chunked(b"new"))

    assert await read_all(driver, f"{uid}/f") == b"new"


async def test_list_is_recursive_relative_to_root_and_filtered_by_prefix(
    driver: BackupStorageDriver, uid: str
) -> None:
    keys = [f"{uid}/c1/b1/vda.qcow2", f"{uid}/c1/b2/vda.qcow2", f"{uid}/c2/b1/vdb.qcow2"]
    for n, key in enumerate(keys):
        await driver.put(key, chunked(b"x" * (n + 1)))

    everything = await driver.list(f"{uid}/")
    assert [(o.key, o.size) for o in everything] == [(k, n + 1) for n, k in enumerate(keys)]
    assert [o.key for o in await driver.list(f"{uid}/c1/")] == keys[:2]
    assert [o.key for o in await driver.list(f"{uid}/c1/b")] == keys[:2]
    assert await driver.list(f"{uid}/nothing-here/") == []
    assert {o.key for o in await driver.list("")} >= set(keys)


async def test_delete_removes_the_object_and_is_idempotent(
    driver: BackupStorageDriver, uid: str
) -> None:
    await driver.put(f"{uid}/gone", chunked(b"data"))

    await driver.delete(f"{uid}/gone")
    await driver.delete(f"{uid}/gone")
    await driver.delete(f"{uid}/never/existed")

    with pytest.raises(ObjectNotFound):
        await driver.stat(f"{uid}/gone")
    assert await driver.list(f"{uid}/") == []


async def test_get_and_stat_of_a_missing_key_raise_object_not_found(
    driver: BackupStorageDriver, uid: str
) -> None:
    with pytest.raises(ObjectNotFound):
        await read_all(driver, f"{uid}/missing.qcow2")
    with pytest.raises(ObjectNotFound):
        await driver.stat(f"{uid}/missing.qcow2")


async def test_source_failing_midway_leaves_no_object_and_no_temp_file(
    backend: Backend, driver: BackupStorageDriver, uid: str
) -> None:
    data = payload(16 * MiB, seed=2)
    source = failing(data, after=12 * MiB, error=RuntimeError("disk read failed"))

    with pytest.raises(RuntimeError, match="disk read failed"):
        await driver.put(f"{uid}/vda.qcow2", source)

    assert leftovers(backend, uid) == []
    assert await driver.partial_uploads(f"{uid}/") == []
    with pytest.raises(ObjectNotFound):
        await driver.stat(f"{uid}/vda.qcow2")


async def test_cancelled_upload_leaves_no_object_and_no_temp_file(
    backend: Backend, driver: BackupStorageDriver, uid: str
) -> None:
    sent_enough = asyncio.Event()

    async def stalls_after_three_parts() -> AsyncIterator[bytes]:
        async for chunk in chunked(payload(16 * MiB, seed=3), MiB):
            yield chunk
        sent_enough.set()
        await asyncio.Event().wait()  # like a hung disk read
        yield b""

    upload = asyncio.create_task(driver.put(f"{uid}/vda.qcow2", stalls_after_three_parts()))
    await asyncio.wait_for(sent_enough.wait(), timeout=30)
    await asyncio.sleep(0.3)
    upload.cancel()

    with pytest.raises(asyncio.CancelledError):
        await upload
    assert leftovers(backend, uid) == []


async def test_a_partial_upload_left_by_a_killed_writer_is_found_and_discarded(
    backend: Backend, driver: BackupStorageDriver, uid: str
) -> None:
    finished, unfinished = f"{uid}/c/b/vda.qcow2", f"{uid}/c/b/vdb.qcow2"
    await driver.put(finished, chunked(b"a whole disk image"))
    handle = backend.leave_partial(unfinished)

    partials = await driver.partial_uploads(f"{uid}/")

    assert [(p.key, p.handle) for p in partials] == [(unfinished, handle)]
    assert isinstance(partials[0].started, datetime)
    assert await driver.partial_uploads(f"{uid}/c/b/vdb") == partials
    assert await driver.partial_uploads(f"{uid}/c/b/vda") == []
    assert [o.key for o in await driver.list(f"{uid}/")] == [finished]

    await driver.discard(partials[0])
    await driver.discard(partials[0])  # already gone: nothing to do

    assert await driver.partial_uploads(f"{uid}/") == []
    assert leftovers(backend, uid) == [finished]


async def test_discard_never_removes_a_stored_object(driver: BackupStorageDriver, uid: str) -> None:
    await driver.put(f"{uid}/f", chunked(b"kept"))

    # File backends refuse a handle that is not a temp file; S3 finds no such upload.
    with contextlib.suppress(ValueError):
        await driver.discard(PartialUpload(f"{uid}/f", f"{uid}/f", None))

    assert await read_all(driver, f"{uid}/f") == b"kept"


async def test_check_passes_and_leaves_no_probe_behind(
    backend: Backend, driver: BackupStorageDriver
) -> None:
    result = await driver.check()

    assert result.ok, result.error
    assert result.error is None
    assert result.latency_ms is not None and result.latency_ms > 0
    if backend.kind in ("local", "nfs", "sftp"):
        assert result.free_bytes is not None and result.free_bytes > 0
    assert leftovers(backend, ".ibp-check") == []


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside", "a/../../outside", "a//b", "./a", ""])
async def test_keys_that_could_escape_the_root_are_rejected(
    driver: BackupStorageDriver, bad: str
) -> None:
    with pytest.raises(ValueError):
        await driver.put(bad, chunked(b"x"))
    with pytest.raises(ValueError):
        await read_all(driver, bad)
    with pytest.raises(ValueError):
        await driver.stat(bad)
    with pytest.raises(ValueError):
        await driver.delete(bad)
