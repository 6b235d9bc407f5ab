"""Local file <-> chunk stream helpers shared by the local driver and the backup engine."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator
from io import BufferedWriter
from pathlib import Path

from app.storage.base import (
    CHUNK_SIZE,
    BackupStorageDriver,
    PutResult,
    Sha256Counter,
    StorageError,
    StorageFull,
    temp_name,
)

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


async def iter_file(
    path: str | os.PathLike[str], chunk_size: int = CHUNK_SIZE
) -> AsyncIterator[bytes]:
    """Stream a file as chunks, reading the next chunk while the consumer handles this one."""
    f = await asyncio.to_thread(open, path, "rb")
    pending: asyncio.Future[bytes] | None = None
    try:
        # One read ahead overlaps disk reads with network writes; memory stays at two chunks.
        pending = asyncio.ensure_future(asyncio.to_thread(f.read, chunk_size))
        while True:
            chunk = await pending
            if not chunk:
                return
            pending = asyncio.ensure_future(asyncio.to_thread(f.read, chunk_size))
            yield chunk
    finally:
        if pending is not None and not pending.done():
            # The thread cannot be interrupted; wait so the file is not closed under it.
            with contextlib.suppress(BaseException):
                await asyncio.shield(pending)
        await asyncio.to_thread(f.close)


async def write_stream_to_file(
    chunks: AsyncIterator[bytes], path: str | os.PathLike[str]
) -> PutResult:
    """Write a stream atomically: temp file in the same dir, fsync, rename, fsync the dir.

    On any failure (including cancellation) the temp file is removed and `path` is untouched.
    """
    target = Path(path)
    await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
    tmp = target.parent / temp_name(target.name)
    counter = Sha256Counter()
    f = await asyncio.to_thread(open, tmp, "xb")
    try:
        try:
            async for chunk in chunks:
                await asyncio.to_thread(_write_and_hash, f, chunk, counter)
            await asyncio.to_thread(_flush_and_sync, f)
        finally:
            await asyncio.to_thread(f.close)
        await asyncio.to_thread(os.replace, tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            await asyncio.shield(asyncio.to_thread(tmp.unlink, True))
        if isinstance(exc, OSError):
            raise translate_os_error(exc, f"writing {target}") from exc
        raise
    await asyncio.to_thread(_fsync_dir, target.parent)
    return counter.result()


def translate_os_error(exc: OSError, doing: str) -> StorageError:
    if exc.errno in _NO_SPACE:
        return StorageFull(f"no space left while {doing}: {exc.strerror}")
    return StorageError(f"error while {doing}: {exc.strerror or exc}")


def _write_and_hash(f: BufferedWriter, chunk: bytes, counter: Sha256Counter) -> None:
    f.write(chunk)
    counter.update(chunk)


def _flush_and_sync(f: BufferedWriter) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def put_file(driver: BackupStorageDriver, key: str, path: Path) -> PutResult:
    """Store a local file the cheapest way the driver offers; the file may be consumed."""
    adopt = getattr(driver, "adopt_file", None)
    if adopt is not None:
        result: PutResult = await adopt(key, path)
        return result
    return await driver.put(key, iter_file(path))
