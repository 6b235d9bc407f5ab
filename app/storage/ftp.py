"""FTP and explicit-FTPS storage through aioftp; one control connection per operation."""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import ssl
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

import aioftp

from app.storage.base import (
    CHUNK_SIZE,
    BackupStorageDriver,
    CheckResult,
    ObjectInfo,
    ObjectNotFound,
    PartialUpload,
    PutResult,
    Sha256Counter,
    StorageError,
    StorageFull,
    StorageUnreachable,
    coalesce,
    is_temp_name,
    partials_among,
    prefix_dir,
    run_check,
    temp_name,
    validate_key,
    validate_prefix,
)

_NETWORK = (OSError, TimeoutError, asyncio.IncompleteReadError, ConnectionError)


class FtpDriver(BackupStorageDriver):
    def __init__(self, config: Mapping[str, Any]) -> None:
        for name in ("host", "username"):
            if not config.get(name):
                raise ValueError(f"ftp storage config is missing {name!r}")
        self.host = str(config["host"])
        self.port = int(config.get("port") or 21)
        self.username = str(config["username"])
        self._password = str(config.get("password") or "")
        self.root = str(config.get("path") or ".")
        self.tls = bool(config.get("tls"))
        # Optional PEM bundle for servers with a private CA or self-signed certificate.
        self._ca_cert = config.get("ca_cert") or None

    @property
    def _where(self) -> str:
        return f"{self.host}:{self.port}"

    def _path(self, key: str) -> str:
        return posixpath.join(self.root, validate_key(key))

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[aioftp.Client]:
        # FTP allows one transfer per control connection, so each operation gets its own;
        # that also keeps concurrent puts from the engine independent.
        client = aioftp.Client(socket_timeout=60, connection_timeout=15, encoding="utf-8")
        try:
            await client.connect(self.host, self.port)
            if self.tls:
                await client.upgrade_to_tls(ssl.create_default_context(cadata=self._ca_cert))
            await client.login(self.username, self._password)
        except aioftp.StatusCodeError as exc:
            client.close()
            if "530" in _codes(exc):
                raise StorageUnreachable(
                    f"FTP login failed for user '{self.username}' at {self._where}",
                    reason="login refused",
                ) from None
            raise StorageUnreachable(
                f"FTP server {self._where} refused the session: {_info(exc)}",
                reason="the server refused the session",
            ) from None
        except ssl.SSLError as exc:
            client.close()
            raise StorageUnreachable(
                f"TLS handshake with FTP server {self._where} failed: {exc}"
            ) from None
        except _NETWORK as exc:
            client.close()
            raise StorageUnreachable(
                f"cannot connect to FTP server {self._where}: {exc!r}"
            ) from None
        try:
            yield client
        finally:
            client.close()

    def _translate(self, exc: BaseException, doing: str, path: str) -> StorageError:
        if isinstance(exc, aioftp.StatusCodeError):
            codes = _codes(exc)
            if codes & {"452", "552"}:
                return StorageFull(f"FTP server {self._where} is out of space while {doing} {path}")
            return StorageError(f"FTP server {self._where} refused {doing} {path}: {_info(exc)}")
        return StorageUnreachable(
            f"FTP connection to {self._where} lost while {doing} {path}: {exc!r}"
        )

    async def put(
        self, key: str, chunks: AsyncIterator[bytes], size: int | None = None
    ) -> PutResult:
        path = self._path(key)
        tmp = temp_name(path)
        counter = Sha256Counter()
        async with self._session() as client:
            try:
                await client.make_directory(posixpath.dirname(path), parents=True)
                async with client.upload_stream(tmp) as stream:
                    async for chunk in chunks:
                        hashing = asyncio.to_thread(counter.update, chunk)
                        await asyncio.gather(hashing, stream.write(chunk))
                await self._rename(client, tmp, path)
            except BaseException as exc:
                # A fresh session: this one may be mid-transfer or dead.
                await asyncio.shield(self._remove_quietly(tmp))
                if isinstance(exc, (aioftp.StatusCodeError, *_NETWORK)):
                    raise self._translate(exc, "writing", path) from None
                raise
        return counter.result()

    async def _rename(self, client: aioftp.Client, tmp: str, path: str) -> None:
        try:
            await client.rename(tmp, path)
        except aioftp.StatusCodeError:
            # Some servers refuse to rename over an existing file.
            await client.remove_file(path)
            await client.rename(tmp, path)

    async def _remove_quietly(self, path: str) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(15), self._session() as client:
                await client.remove_file(path)

    async def get(self, key: str) -> AsyncIterator[bytes]:
        path = self._path(key)
        async with self._session() as client:
            try:
                async with client.download_stream(path) as stream:
                    async for chunk in coalesce(stream.iter_by_block(CHUNK_SIZE)):
                        yield chunk
            except aioftp.StatusCodeError as exc:
                if "550" in _codes(exc):
                    raise ObjectNotFound(f"{path} not found on FTP server {self._where}") from None
                raise self._translate(exc, "reading", path) from None
            except _NETWORK as exc:
                raise self._translate(exc, "reading", path) from None

    async def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        async with self._session() as client:
            try:
                info = await client.stat(path)
            except aioftp.StatusCodeError as exc:
                if "550" in _codes(exc):
                    raise ObjectNotFound(f"{path} not found on FTP server {self._where}") from None
                raise self._translate(exc, "reading", path) from None
            except _NETWORK as exc:
                raise self._translate(exc, "reading", path) from None
        if info.get("type") != "file":
            raise ObjectNotFound(f"{path} is not a file on FTP server {self._where}")
        return ObjectInfo(key, int(info.get("size", 0)), _modified(info.get("modify")))

    async def _files(self, prefix: str, temps: bool) -> list[ObjectInfo]:
        """The files whose key starts with `prefix`: the stored objects, or with `temps` only
        the temp files of unfinished writes."""
        validate_prefix(prefix)
        root = PurePosixPath(self.root)
        start = root / prefix_dir(prefix)
        found: list[ObjectInfo] = []
        async with self._session() as client:
            try:
                async for entry, info in client.list(start, recursive=True):
                    key = str(PurePosixPath(entry).relative_to(root))
                    wanted = key.startswith(prefix) and is_temp_name(key) == temps
                    if info.get("type") == "file" and wanted:
                        size = int(info.get("size", 0))
                        found.append(ObjectInfo(key, size, _modified(info.get("modify"))))
            except aioftp.StatusCodeError as exc:
                if "550" not in _codes(exc):  # 550: the directory does not exist yet
                    raise self._translate(exc, "listing", str(start)) from None
            except _NETWORK as exc:
                raise self._translate(exc, "listing", str(start)) from None
        return sorted(found, key=lambda info: info.key)

    async def partial_uploads(self, prefix: str) -> list[PartialUpload]:
        return partials_among(await self._files(prefix, temps=True), prefix)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        return await self._files(prefix, temps=False)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        async with self._session() as client:
            try:
                await client.remove_file(path)
            except aioftp.StatusCodeError as exc:
                # 550 also means "permission denied"; only a missing file is fine.
                if "550" in _codes(exc) and not await client.exists(path):
                    return
                raise self._translate(exc, "deleting", path) from None
            except _NETWORK as exc:
                raise self._translate(exc, "deleting", path) from None

    async def free_bytes(self) -> int | None:
        return None  # plain FTP has no portable free-space command

    async def check(self) -> CheckResult:
        return await run_check(self)

    async def close(self) -> None:
        return None  # no connection outlives an operation


def _codes(exc: aioftp.StatusCodeError) -> set[str]:
    return {str(code) for code in exc.received_codes}


def _info(exc: aioftp.StatusCodeError) -> str:
    lines = exc.info if isinstance(exc.info, list) else [exc.info]
    return " ".join(str(line).strip() for line in lines)


def _modified(value: object) -> datetime | None:
    # MLSD "modify" facts are UTC: YYYYMMDDHHMMSS[.sss]
    try:
        return datetime.strptime(str(value)[:14], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None
