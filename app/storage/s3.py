"""S3 and S3-compatible storage through aioboto3, with a hand-written bounded multipart upload."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, TypeVar

import aioboto3
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from app.storage.base import (
    CHUNK_SIZE,
    MIN_READ,
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
    run_check,
    validate_key,
    validate_prefix,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

T = TypeVar("T")
log = logging.getLogger(__name__)

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's floor for every part but the last
# aiohttp copies each part in flight about three times (join with headers, transport
# buffer); 5 MiB x 2 in flight keeps a 4 GiB upload under ~150 MB RSS, and throughput on
# loopback was the same as with 16 MiB parts (the server is the limit there).
DEFAULT_PART_SIZE = MIN_PART_SIZE
DEFAULT_PARTS_IN_FLIGHT = 2
# S3 allows 10,000 parts; doubling the part size every 2,000 parts lets one object reach
# ~310 GB from 5 MiB parts (more with a larger `part_size`) without knowing its size.
PART_GROWTH_EVERY = 2000
MAX_PARTS = 10_000
MiB = 1024 * 1024
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_FULL_CODES = {"EntityTooLarge", "QuotaExceeded", "XMinioStorageFull"}
# An abort that fails (the connection dropped mid-upload) is tried again after each pause,
# ~15 s in all, so a short outage does not leave the parts stored and billed.
ABORT_RETRY_DELAYS: tuple[float, ...] = (0.5, 1, 2, 4, 8)
# A URL's query carries the upload id, the part number or a presigned signature.
_URL_QUERY = re.compile(r"(\w+://[^\s?#'\"]*)[?#][^\s'\"]*")
_UPLOAD_ID = re.compile(r"upload[\s_-]?id\s*[=:]\s*['\"]?[\w.~-]+", re.IGNORECASE)


class S3Driver(BackupStorageDriver):
    def __init__(self, config: Mapping[str, Any]) -> None:
        for name in ("bucket", "access_key_id", "secret_access_key"):
            if not config.get(name):
                raise ValueError(f"s3 storage config is missing {name!r}")
        self.bucket = str(config["bucket"])
        self.endpoint = config.get("endpoint_url") or None
        prefix = str(config.get("prefix") or "").strip("/")
        self._prefix = f"{prefix}/" if prefix else ""
        self._part_size = max(MIN_PART_SIZE, int(config.get("part_size", DEFAULT_PART_SIZE)))
        self._in_flight = max(1, int(config.get("parts_in_flight", DEFAULT_PARTS_IN_FLIGHT)))
        self._session = aioboto3.Session(
            aws_access_key_id=str(config["access_key_id"]),
            aws_secret_access_key=str(config["secret_access_key"]),
            region_name=str(config.get("region") or "us-east-1"),
        )
        self._config = AioConfig(
            s3={"addressing_style": "path" if config.get("path_style") else "auto"},
            # S3-compatible servers reject or mangle AWS's newer default checksums.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
            max_pool_connections=max(10, self._in_flight * 2),
        )
        self._client: S3Client | None = None
        self._stack = AsyncExitStack()
        self._lock = asyncio.Lock()

    @property
    def _where(self) -> str:
        return self.endpoint or "AWS S3"

    async def _s3(self) -> S3Client:
        async with self._lock:
            client = self._client
            if client is None:
                client = await self._stack.enter_async_context(
                    self._session.client("s3", endpoint_url=self.endpoint, config=self._config)
                )
                self._client = client
            return client

    def _translate(self, exc: Exception, doing: str, key: str | None) -> StorageError:
        what = f"'{key}'" if key else f"bucket '{self.bucket}'"
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            message = _scrub(str(err.get("Message") or code))
            if code == "NoSuchBucket":
                return StorageUnreachable(
                    f"S3 bucket '{self.bucket}' does not exist at {self._where}",
                    reason="the bucket does not exist",
                )
            if code in _NOT_FOUND_CODES:
                return ObjectNotFound(f"{key} not found in S3 bucket '{self.bucket}'")
            if code in _AUTH_CODES:
                return StorageUnreachable(
                    f"S3 credentials rejected by {self._where} for bucket '{self.bucket}' ({code})",
                    reason="credentials rejected",
                )
            if code in _FULL_CODES:
                return StorageFull(f"S3 refused {what}: {code}: {message}")
            return StorageError(f"S3 {doing} of {what} failed: {code}: {message}")
        if isinstance(exc, BotoCoreError | OSError | asyncio.TimeoutError):
            return StorageUnreachable(f"cannot reach S3 endpoint {self._where}: {_scrub(str(exc))}")
        return StorageError(f"S3 {doing} of {what} failed: {_scrub(str(exc))}")

    async def _call(self, doing: str, key: str | None, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except (TimeoutError, ClientError, BotoCoreError, OSError) as exc:
            raise self._translate(exc, doing, key) from exc

    def _key(self, key: str) -> str:
        return self._prefix + validate_key(key)

    async def put(
        self, key: str, chunks: AsyncIterator[bytes], size: int | None = None
    ) -> PutResult:
        counter = Sha256Counter()
        base = self._part_size
        if size is not None:  # one part size that fits the object in S3's 10,000 parts
            base = max(base, -(-size // (MAX_PARTS * MiB)) * MiB)
        await self._upload(key, self._parts(chunks, counter, base))
        return counter.result()

    async def _upload(self, key: str, parts: AsyncIterator[bytes | bytearray]) -> None:
        s3_key = self._key(key)
        client = await self._s3()
        first: bytes | bytearray = await anext(parts, bytearray())
        second: bytes | bytearray | None = None
        if len(first) >= self._part_size:
            second = await anext(parts, None)
        if second is None:
            # Whole object fits one part: a plain PUT is atomic on its own.
            await self._call(
                "upload",
                key,
                client.put_object(Bucket=self.bucket, Key=s3_key, Body=bytes(first)),
            )
        else:
            head: list[bytes | bytearray] = [first, second]
            del first, second  # only the chain may hold them, so sent parts can be freed
            await self._multipart(client, key, s3_key, _chain(head, parts))

    async def _parts(
        self, chunks: AsyncIterator[bytes], counter: Sha256Counter, base: int
    ) -> AsyncIterator[bytearray]:
        """Group chunks into parts of at least the current part size.

        Each part is filled in place and handed over without a copy: one part filling plus
        the parts in flight is all the memory an upload holds.
        """
        part = bytearray()
        number = 0
        async for chunk in chunks:
            # Hash in a thread (hashlib releases the GIL) so in-flight parts keep moving.
            await asyncio.to_thread(counter.update, chunk)
            part += chunk
            if len(part) >= base << (number // PART_GROWTH_EVERY):
                number += 1
                yield part
                part = bytearray()
        if part or number == 0:
            yield part

    async def _multipart(
        self, client: S3Client, key: str, s3_key: str, parts: AsyncIterator[bytes | bytearray]
    ) -> None:
        created = await self._call(
            "start of multipart upload",
            key,
            client.create_multipart_upload(Bucket=self.bucket, Key=s3_key),
        )
        upload_id = created["UploadId"]
        etags: dict[int, str] = {}
        tasks: set[asyncio.Task[None]] = set()

        async def send(number: int, part: bytes | bytearray) -> None:
            # aiohttp copies a bytearray body again when slicing it; bytes it sends as is.
            # clear() frees the part's buffer now, whoever else still holds the object.
            if isinstance(part, bytearray):
                body = bytes(part)
                part.clear()
            else:
                body = part
            resp = await self._call(
                f"upload of part {number}",
                key,
                client.upload_part(
                    Bucket=self.bucket,
                    Key=s3_key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                ),
            )
            etags[number] = resp["ETag"]

        try:
            number = 0
            async for body in parts:
                number += 1
                # Keep the bytes in flight constant as parts grow.
                limit = max(1, self._in_flight * self._part_size // len(body))
                while len(tasks) >= limit:
                    done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()
                tasks.add(asyncio.create_task(send(number, body)))
                del body  # the task holds the only reference, so memory frees once it is sent
            while tasks:
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()
            listing: list[CompletedPartTypeDef] = [
                {"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)
            ]
            await self._call(
                "completion of multipart upload",
                key,
                client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=s3_key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": listing},
                ),
            )
        except BaseException:
            # Shielded so a second cancellation cannot skip the abort; S3 would otherwise
            # bill the uploaded parts until a lifecycle rule removes them.
            await asyncio.shield(self._abort(client, s3_key, upload_id, tasks))
            raise

    async def _abort(
        self, client: S3Client, s3_key: str, upload_id: str, tasks: set[asyncio.Task[None]]
    ) -> None:
        """Stop the parts in flight and abort the upload, so its parts are not kept (and
        billed). A failed abort is tried again after each of ABORT_RETRY_DELAYS; an upload
        still open after that is swept by the storage reconciler through partial_uploads()
        and discard()."""
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        error: Exception | None = None
        for delay in (0, *ABORT_RETRY_DELAYS):
            await asyncio.sleep(delay)
            try:
                await client.abort_multipart_upload(
                    Bucket=self.bucket, Key=s3_key, UploadId=upload_id
                )
                return
            except Exception as exc:  # the original error matters more than this one
                if _upload_gone(exc):
                    return
                error = exc
        log.warning(
            "could not abort the S3 multipart upload of %s, left for the storage reconciler: %s",
            s3_key,
            _scrub(str(error)),
        )

    async def get(self, key: str) -> AsyncIterator[bytes]:
        s3_key = self._key(key)
        client = await self._s3()
        resp = await self._call("download", key, client.get_object(Bucket=self.bucket, Key=s3_key))
        body = resp["Body"]
        # Enter the body itself: its __aenter__ returns the raw aiohttp response.
        async with body:

            async def raw() -> AsyncIterator[bytes]:
                while chunk := await self._call("download", key, body.read(CHUNK_SIZE)):
                    yield chunk

            async for chunk in coalesce(raw(), MIN_READ):
                yield chunk

    async def stat(self, key: str) -> ObjectInfo:
        client = await self._s3()
        head = await self._call(
            "stat", key, client.head_object(Bucket=self.bucket, Key=self._key(key))
        )
        return ObjectInfo(key, int(head["ContentLength"]), head.get("LastModified"))

    async def partial_uploads(self, prefix: str) -> list[PartialUpload]:
        full_prefix = self._prefix + validate_prefix(prefix)
        client = await self._s3()
        found: list[PartialUpload] = []
        try:
            pages = client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=full_prefix
            )
            async for page in pages:
                for upload in page.get("Uploads", []):
                    s3_key = upload["Key"]
                    if s3_key.startswith(full_prefix):  # not every S3-compatible server filters
                        key = s3_key[len(self._prefix) :]
                        found.append(
                            PartialUpload(key, upload["UploadId"], upload.get("Initiated"))
                        )
        except (TimeoutError, ClientError, BotoCoreError, OSError) as exc:
            # rclone's `serve s3` (gofakes3) answers the listing of a bucket it holds no
            # upload for (none begun since it started) with NoSuchUpload: there is none.
            if not _upload_gone(exc):
                raise self._translate(exc, "listing of unfinished uploads", None) from exc
        return sorted(found, key=lambda upload: (upload.key, upload.handle))

    async def list(self, prefix: str) -> list[ObjectInfo]:
        full_prefix = self._prefix + validate_prefix(prefix)
        client = await self._s3()
        found: list[ObjectInfo] = []
        try:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full_prefix
            )
            async for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self._prefix) :]
                    found.append(ObjectInfo(key, int(obj.get("Size", 0)), obj.get("LastModified")))
        except (TimeoutError, ClientError, BotoCoreError, OSError) as exc:
            raise self._translate(exc, "listing", None) from exc
        return sorted(found, key=lambda info: info.key)

    async def discard(self, upload: PartialUpload) -> None:
        client = await self._s3()
        try:
            await client.abort_multipart_upload(
                Bucket=self.bucket, Key=self._key(upload.key), UploadId=upload.handle
            )
        except (TimeoutError, ClientError, BotoCoreError, OSError) as exc:
            if not _upload_gone(exc):
                raise self._translate(exc, "abort of unfinished upload", upload.key) from exc

    async def delete(self, key: str) -> None:
        client = await self._s3()
        # DeleteObject succeeds for a missing key, which is the idempotence we want.
        await self._call(
            "delete", key, client.delete_object(Bucket=self.bucket, Key=self._key(key))
        )

    async def free_bytes(self) -> int | None:
        return None  # S3 has no notion of free space

    async def check(self) -> CheckResult:
        return await run_check(self)

    async def close(self) -> None:
        async with self._lock:
            with contextlib.suppress(Exception):
                await self._stack.aclose()
            self._client = None
            self._stack = AsyncExitStack()


def _upload_gone(exc: Exception) -> bool:
    """The multipart upload no longer exists: aborted or completed already."""
    code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
    return code == "NoSuchUpload"


def _scrub(text: str) -> str:
    """`text` without URL queries or upload ids: operators read it and jobs store it, and it
    must carry neither a presigned signature nor a handle on a live upload."""
    return _UPLOAD_ID.sub("upload id (hidden)", _URL_QUERY.sub(r"\1", text))


async def _chain(
    head: list[bytes | bytearray], rest: AsyncIterator[bytes | bytearray]
) -> AsyncIterator[bytes | bytearray]:
    while head:
        yield head.pop(0)
    async for part in rest:
        yield part
