"""Atomic local file writes from a stream, and fsync helpers."""

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
from app.storage.pipeline import StreamWriter

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


async def write_stream_to_file(
    chunks: AsyncIterator[bytes], path: str | os.PathLike[str], direct: bool = False
) -> PutResult:
    """Write a stream atomically: temp file in the same dir, fsync, rename, fsync the dir.

    Each chunk is written in one thread while another hashes it, so a chunk costs the slower
    of the two; the producer (reads from an NBD export) keeps going meanwhile. With ``direct``
    the file bypasses the page cache where the filesystem allows (``StreamWriter``).
    On any failure (including cancellation) the temp file is removed and `path` is untouched.
    """

    async def fill(f: BufferedWriter) -> PutResult:
        counter = Sha256Counter()
        writer = StreamWriter(f.fileno(), direct)
        async for chunk in chunks:
            await asyncio.gather(
                asyncio.to_thread(writer.write, chunk), asyncio.to_thread(counter.update, chunk)
            )
        await asyncio.to_thread(os.fsync, f.fileno())
        return counter.result()

    return await _atomic_write(Path(path), fill)


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


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
