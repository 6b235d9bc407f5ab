"""Atomic local file writes, from a stream or a copy, and fsync helpers."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from io import BufferedWriter
from pathlib import Path

from app.storage.base import (
    PutResult,
    Sha256Counter,
    StorageError,
    StorageFull,
    temp_name,
)
from app.storage.pipeline import copy_and_hash

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


async def write_stream_to_file(
    chunks: AsyncIterator[bytes], path: str | os.PathLike[str]
) -> PutResult:
    """Write a stream atomically: temp file in the same dir, fsync, rename, fsync the dir.

    On any failure (including cancellation) the temp file is removed and `path` is untouched.
    """

    async def fill(f: BufferedWriter) -> PutResult:
        counter = Sha256Counter()
        async for chunk in chunks:
            await asyncio.to_thread(_write_and_hash, f, chunk, counter)
        await asyncio.to_thread(_flush_and_sync, f)
        return counter.result()

    return await _atomic_write(Path(path), fill)


async def copy_file(source: Path, path: str | os.PathLike[str], direct: bool) -> PutResult:
    """Copy a local file atomically, as `write_stream_to_file` does, through `copy_and_hash`
    (bypassing the page cache when ``direct``)."""

    def copy(f: BufferedWriter) -> PutResult:
        with open(source, "rb", buffering=0) as src:
            result = copy_and_hash(src, f.fileno(), direct)
        os.fsync(f.fileno())
        return result

    return await _atomic_write(Path(path), lambda f: asyncio.to_thread(copy, f))


async def _atomic_write(
    target: Path, fill: Callable[[BufferedWriter], Awaitable[PutResult]]
) -> PutResult:
    await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
    tmp = target.parent / temp_name(target.name)
    f = await asyncio.to_thread(open, tmp, "xb")
    try:
        try:
            result = await fill(f)
        finally:
            await asyncio.to_thread(f.close)
        await asyncio.to_thread(os.replace, tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            await asyncio.shield(asyncio.to_thread(tmp.unlink, True))
        if isinstance(exc, OSError):
            raise translate_os_error(exc, f"writing {target}") from exc
        raise
    await asyncio.to_thread(fsync_path, target.parent)  # the rename is durable only then
    return result


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


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
