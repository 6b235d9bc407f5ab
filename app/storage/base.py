"""The storage driver contract: result types, the error family, the Protocol, key rules and
the stream helpers drivers share."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import posixpath
import re
import secrets
import socket
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol

# 1 MiB chunks stay in CPU cache between read, hash and write; 8 MiB chunks made the
# local copy 2x slower (fresh mmap'd buffers, cache misses) on the test machine.
CHUNK_SIZE = 1024 * 1024

# Network reads arrive in small pieces; joining them to 1 MiB keeps consumers'
# per-chunk costs (thread hops, hashing calls) negligible.
MIN_READ = 1024 * 1024

# Temporary names written during put(); list() hides them so a half-written
# upload is never mistaken for a backup file, partial_uploads() finds them.
_TEMP_RE = re.compile(r"\.part-[0-9a-f]{16}$")


@dataclass(frozen=True)
class PutResult:
    size: int
    sha256: str


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime | None


@dataclass(frozen=True)
class PartialUpload:
    """An upload begun and never finished (its writer was killed): not listed, still
    taking space until discarded.

    `key` is the object it would have become; `handle` names the partial itself (the temp
    file's key on file backends, the UploadId on S3); `started` is when it was begun.
    """

    key: str
    handle: str
    started: datetime | None


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    latency_ms: float | None
    free_bytes: int | None
    error: str | None  # what failed, in words safe to show a caller (no address, no banner)
    detail: str | None = None  # the driver's own words, hosts included: for the worker's log


class StorageError(Exception):
    """A storage operation failed; the message is meant for an operator (it may name hosts,
    paths and what a server said). `reason`, when the driver knows it, is a short phrase that
    names no address and quotes no server ("login refused"): what a storage check shows."""

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class StorageUnreachable(StorageError):
    """Cannot talk to the storage: network, login, host key or missing bucket."""


class ObjectNotFound(StorageError):
    """The key does not exist."""


class StorageFull(StorageError):
    """The storage has no room left for the object; `needed` and `free` (bytes) when known."""

    def __init__(self, message: str, needed: int | None = None, free: int | None = None) -> None:
        super().__init__(message, reason="the storage is full")
        self.needed, self.free = needed, free


class BackupStorageDriver(Protocol):
    """What a driver can do. Drivers subclass it, so the methods with a body here are
    defaults every driver has; a driver overrides one where it has a better way."""

    async def put(
        self, key: str, chunks: AsyncIterator[bytes], size: int | None = None
    ) -> PutResult:
        """Store the stream under ``key``, hashing the very bytes stored. ``size``, when the
        caller knows it, is the stream's exact length (S3 picks its part size from it).
        On failure nothing is left under ``key`` and no upload stays open."""
        ...

    async def local_path(self, key: str) -> Path | None:
        """Where the object at ``key`` is (or would be) a local file; None if not local."""
        return None

    # Declared without `async` so that an `async def ... yield` generator matches.
    def get(self, key: str) -> AsyncIterator[bytes]: ...

    async def stat(self, key: str) -> ObjectInfo: ...

    async def partial_uploads(self, prefix: str) -> list[PartialUpload]:
        """Every unfinished upload whose key starts with `prefix`, so that what a killed
        worker left can be found (list() hides these)."""
        ...

    async def discard(self, upload: PartialUpload) -> None:
        """Remove an unfinished upload; one already gone is fine.

        Default for the file backends, whose partials are temp files that delete() removes.
        """
        await self.delete(temp_key_of(upload))

    async def list(self, prefix: str) -> list[ObjectInfo]: ...

    async def delete(self, key: str) -> None: ...

    async def free_bytes(self) -> int | None: ...

    async def check(self) -> CheckResult: ...

    async def close(self) -> None: ...


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative '/'-separated path, else raise ValueError."""
    if not isinstance(key, str) or not key:
        raise ValueError("storage key must be a non-empty string")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"storage key {key!r} must be a relative '/'-separated path")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"storage key {key!r} must not contain empty, '.' or '..' parts")
    return key


def validate_prefix(prefix: str) -> str:
    """Prefixes follow key rules but may be empty or end with '/'."""
    if prefix:
        validate_key(prefix.rstrip("/") or "/")
    return prefix


def prefix_dir(prefix: str) -> str:
    """The deepest directory that can hold keys starting with `prefix` ('' = root)."""
    return prefix if prefix.endswith("/") else posixpath.dirname(prefix)


def temp_name(key: str) -> str:
    return f"{key}.part-{secrets.token_hex(8)}"


def is_temp_name(name: str) -> bool:
    return _TEMP_RE.search(name) is not None


def partials_among(temps: list[ObjectInfo], prefix: str) -> list[PartialUpload]:
    """The temp files a file backend listed, as partial uploads of keys starting with
    `prefix` (a temp's own key may match a prefix its object's key does not)."""
    found = [PartialUpload(_TEMP_RE.sub("", t.key), t.key, t.modified) for t in temps]
    return [upload for upload in found if upload.key.startswith(prefix)]


def temp_key_of(upload: PartialUpload) -> str:
    """The temp file's key of a file backend's partial upload. Refuses any other handle, so
    discarding can never delete a stored object."""
    handle = upload.handle
    if not is_temp_name(handle) or _TEMP_RE.sub("", handle) != upload.key:
        raise ValueError(f"{handle!r} is not a temp file of {upload.key!r}")
    return validate_key(handle)


class Sha256Counter:
    """Running sha256 and byte count of a stream."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        # hashlib drops the GIL for large buffers, so callers may run this in a thread.
        self._hash.update(chunk)
        self.size += len(chunk)

    def result(self) -> PutResult:
        return PutResult(size=self.size, sha256=self._hash.hexdigest())


async def run_check(driver: BackupStorageDriver) -> CheckResult:
    """Write, read back, compare and delete a probe object; report instead of raising.

    `error` says which step failed and why in a few fixed words (see check_failure): the
    caller configuring a storage learns whether it works, not what answers at an address.
    """
    probe = secrets.token_bytes(64 * 1024)
    key = f".ibp-check-{secrets.token_hex(8)}"
    started = time.perf_counter()
    step = "writing a probe failed"
    try:
        await driver.put(key, _one(probe))
        step = "reading the probe back failed"
        try:
            back = b"".join([chunk async for chunk in driver.get(key)])
        except Exception:
            with contextlib.suppress(Exception):
                await driver.delete(key)
            raise
        step = "deleting the probe failed"
        await driver.delete(key)
        if back != probe:
            return CheckResult(
                False, None, None, "the probe read back differs from the one written"
            )
        latency_ms = (time.perf_counter() - started) * 1000
        return CheckResult(True, round(latency_ms, 1), await driver.free_bytes(), None)
    except Exception as exc:  # check() must report, never raise
        detail = str(exc) if isinstance(exc, StorageError) else f"{type(exc).__name__}: {exc}"
        return CheckResult(False, None, None, check_failure(step, exc), detail)


# Causes found under a driver's error, in the words a check shows (first match wins).
_CAUSES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (ConnectionRefusedError, "connection refused"),
    (socket.gaierror, "host name not found"),
    (ssl.SSLError, "TLS handshake failed"),
    (TimeoutError, "timed out"),
    ((ConnectionError, asyncio.IncompleteReadError), "connection lost"),
)
_UNREACHABLE_ERRNOS = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL}


def check_failure(step: str, exc: BaseException) -> str:
    """What failed, without the driver's text: "cannot connect to the storage server
    (connection refused)". Drivers raise with `from None`, so causes are found on the
    exception's context chain."""
    if isinstance(exc, StorageUnreachable):
        step = "cannot connect to the storage server"
    return f"{step} ({_reason(exc)})"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, StorageError) and exc.reason:
        return exc.reason
    seen: BaseException | None = exc
    while seen is not None:
        for kinds, words in _CAUSES:
            if isinstance(seen, kinds):
                return words
        if isinstance(seen, OSError) and seen.errno in _UNREACHABLE_ERRNOS:
            return "host unreachable"
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, ObjectNotFound):
        return "not found"
    if isinstance(exc, StorageUnreachable):
        return "no answer the driver understood"
    if isinstance(exc, StorageError):
        return "refused by the storage"
    return f"unexpected error: {type(exc).__name__}"


def iter_file(
    path: str | os.PathLike[str], chunk_size: int = CHUNK_SIZE
) -> AsyncGenerator[bytes, None]:
    """A local file as a stream of chunks, the next read while the consumer handles this one."""
    return read_blocks(Path(path), lambda _: chunk_size)


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


async def coalesce(chunks: AsyncIterator[bytes], min_size: int = MIN_READ) -> AsyncIterator[bytes]:
    """Join small reads into chunks of at least `min_size` bytes (the last may be smaller)."""
    pending: list[bytes] = []
    size = 0
    async for chunk in chunks:
        pending.append(chunk)
        size += len(chunk)
        if size >= min_size:
            joined = b"".join(pending)
            pending.clear()
            size = 0
            yield joined
    if pending:
        yield b"".join(pending)


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data
