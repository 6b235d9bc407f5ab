"""Local file <-> chunk stream helpers shared by the local driver and the backup engine."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from io import BufferedWriter
from pathlib import Path
from typing import BinaryIO

from app.storage.base import (
    CHUNK_SIZE,
    BackupStorageDriver,
    PutResult,
    Sha256Counter,
    StorageError,
    StorageFull,
    temp_name,
)
from app.storage.pipeline import copy_and_hash

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class FileChunks:
    """A local file as a stream of chunks, reading the next chunk while the consumer handles
    this one. It keeps its ``path``, so a consumer that writes to a local file too (the local
    driver) may copy the file directly instead, as long as nobody has started reading it."""

    def __init__(self, path: str | os.PathLike[str], chunk_size: int = CHUNK_SIZE) -> None:
        self.path = Path(path)
        self.chunk_size = chunk_size
        self._stream: AsyncGenerator[bytes, None] | None = None

    @property
    def started(self) -> bool:
        return self._stream is not None

    def __aiter__(self) -> FileChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._stream is None:
            size = self.chunk_size
            self._stream = read_blocks(self.path, lambda _: size)
        return await anext(self._stream)

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()


def iter_file(path: str | os.PathLike[str], chunk_size: int = CHUNK_SIZE) -> FileChunks:
    return FileChunks(path, chunk_size)


def unread_file(chunks: AsyncIterator[bytes]) -> Path | None:
    """The local file behind a stream nobody has read from yet, which a driver may then read
    its own way; None for any other stream."""
    if isinstance(chunks, FileChunks) and not chunks.started:
        return chunks.path
    return None


async def read_blocks(
    path: Path, block_size: Callable[[int], int], counter: Sha256Counter | None = None
) -> AsyncGenerator[bytes, None]:
    """A local file as blocks: block ``n`` (from 1) is ``block_size(n)`` bytes, read in one call.

    The next block is read while the consumer handles this one (memory: two blocks). With a
    ``counter`` each block is hashed in the thread that read it, so the sha256 covers exactly
    the objects handed out and nothing is copied on the way. An empty file has no blocks.
    """

    def read(f: BinaryIO, size: int) -> bytes:
        data = f.read(size)
        if counter is not None:
            counter.update(data)
        return data

    f = await asyncio.to_thread(open, path, "rb")
    pending: asyncio.Future[bytes] | None = None
    try:
        number = 1
        pending = asyncio.ensure_future(asyncio.to_thread(read, f, block_size(number)))
        while block := await pending:
            number += 1
            pending = asyncio.ensure_future(asyncio.to_thread(read, f, block_size(number)))
            yield block
    finally:
        if pending is not None and not pending.done():
            # The thread cannot be interrupted; wait so the file is not closed under it.
            with contextlib.suppress(BaseException):
                await asyncio.shield(pending)
        await asyncio.to_thread(f.close)


async def write_stream_to_file(
    chunks: AsyncIterator[bytes], path: str | os.PathLike[str], direct: bool = False
) -> PutResult:
    """Write a stream atomically: temp file in the same dir, fsync, rename, fsync the dir.

    On any failure (including cancellation) the temp file is removed and `path` is untouched.
    A stream that is an unread local file (`iter_file`) is copied by `copy_and_hash` instead,
    bypassing the page cache when ``direct``.
    """
    if (source := unread_file(chunks)) is not None:
        return await _atomic_write(Path(path), lambda f: _copy_file_into(source, f, direct))

    async def fill(f: BufferedWriter) -> PutResult:
        counter = Sha256Counter()
        async for chunk in chunks:
            await asyncio.to_thread(_write_and_hash, f, chunk, counter)
        await asyncio.to_thread(_flush_and_sync, f)
        return counter.result()

    return await _atomic_write(Path(path), fill)


async def _copy_file_into(source: Path, f: BufferedWriter, direct: bool) -> PutResult:
    def copy() -> PutResult:
        with open(source, "rb", buffering=0) as src:
            result = copy_and_hash(src, f.fileno(), direct)
        os.fsync(f.fileno())
        return result

    return await asyncio.to_thread(copy)


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


async def put_file(driver: BackupStorageDriver, key: str, path: Path) -> PutResult:
    """Store a local file the cheapest way the driver offers; the file may be consumed."""
    adopt = getattr(driver, "adopt_file", None)
    if adopt is not None:
        result: PutResult = await adopt(key, path)
        return result
    return await driver.put(key, iter_file(path))
