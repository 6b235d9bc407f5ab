"""Local-directory and NFS-mounted storage: plain files under a root path."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.storage.base import (
    CHUNK_SIZE,
    BackupStorageDriver,
    CheckResult,
    ObjectInfo,
    ObjectNotFound,
    PartialUpload,
    PutResult,
    StorageUnreachable,
    is_temp_name,
    iter_file,
    partials_among,
    prefix_dir,
    run_check,
    validate_key,
    validate_prefix,
)
from app.storage.files import translate_os_error, write_stream_to_file


class LocalDriver(BackupStorageDriver):
    # Local disks take backup files past the page cache (see app.storage.pipeline).
    direct_io = True

    def __init__(self, config: Mapping[str, Any]) -> None:
        path = config.get("path")
        if not path or not os.path.isabs(str(path)):
            raise ValueError("local storage config needs an absolute 'path'")
        self.root = Path(str(path))

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    async def _ready(self) -> None:
        """Hook run before each operation; the NFS driver checks its mount here."""
        if not await asyncio.to_thread(self.root.is_dir):
            raise StorageUnreachable(
                f"storage directory {self.root} does not exist",
                reason="the storage directory does not exist",
            )

    async def put(
        self, key: str, chunks: AsyncIterator[bytes], size: int | None = None
    ) -> PutResult:
        target = self._path(key)
        await self._ready()
        return await write_stream_to_file(chunks, target, self.direct_io)

    async def local_path(self, key: str) -> Path:
        path = self._path(key)
        await self._ready()
        return path

    async def get(self, key: str) -> AsyncIterator[bytes]:
        path = self._path(key)
        await self._ready()
        try:
            stream = iter_file(path, CHUNK_SIZE)
            async for chunk in stream:
                yield chunk
        except FileNotFoundError:
            raise ObjectNotFound(f"{key} not found in {self.root}") from None
        except OSError as exc:
            raise translate_os_error(exc, f"reading {path}") from exc

    async def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        await self._ready()
        try:
            st = await asyncio.to_thread(path.stat)
        except FileNotFoundError:
            raise ObjectNotFound(f"{key} not found in {self.root}") from None
        except OSError as exc:
            raise translate_os_error(exc, f"reading {path}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(f"{key} is not a file in {self.root}")
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    async def _files(self, prefix: str, temps: bool) -> list[ObjectInfo]:
        validate_prefix(prefix)
        await self._ready()
        try:
            return await asyncio.to_thread(_walk, self.root, prefix, temps)
        except OSError as exc:
            raise translate_os_error(exc, f"listing {self.root}") from exc

    async def partial_uploads(self, prefix: str) -> list[PartialUpload]:
        return partials_among(await self._files(prefix, temps=True), prefix)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        return await self._files(prefix, temps=False)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await self._ready()
        try:
            await asyncio.to_thread(path.unlink, True)
        except OSError as exc:
            raise translate_os_error(exc, f"deleting {path}") from exc

    async def free_bytes(self) -> int | None:
        try:
            st = await asyncio.to_thread(os.statvfs, self.root)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    async def check(self) -> CheckResult:
        return await run_check(self)

    async def close(self) -> None:
        return None


class NfsDriver(LocalDriver):
    """An NFS share mounted on this host by the operator; `server`/`export` are informative."""

    # Direct writes to NFS are synchronous round trips to the server; the client's own
    # write-behind is the faster path there.
    direct_io = False

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.server = config.get("server")
        self.export = config.get("export")

    async def _ready(self) -> None:
        # Writing into an unmounted mount point would silently fill the local disk.
        if not await asyncio.to_thread(os.path.ismount, self.root):
            share = f" ({self.server}:{self.export})" if self.server and self.export else ""
            raise StorageUnreachable(
                f"{self.root} is not a mount point; is the NFS share{share} mounted?",
                reason="the NFS share is not mounted",
            )


def _walk(root: Path, prefix: str, temps: bool) -> list[ObjectInfo]:
    """The files whose key starts with `prefix`: the stored objects, or with `temps` only the
    temp files of unfinished writes."""
    found: list[ObjectInfo] = []
    start = root / prefix_dir(prefix)
    for dirpath, _dirs, files in os.walk(start):
        for name in files:
            full = os.path.join(dirpath, name)
            key = os.path.relpath(full, root).replace(os.sep, "/")
            if not key.startswith(prefix) or is_temp_name(name) != temps:
                continue
            try:
                st = os.stat(full)
            except FileNotFoundError:  # deleted while walking
                continue
            found.append(ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)))
    return sorted(found, key=lambda info: info.key)
