"""S3 specifics: large multipart objects, error texts, aborts, a server dying mid-upload."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Iterator

import pytest
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError

from app.storage import ObjectNotFound, StorageUnreachable, get_driver
from tests.storage import servers
from tests.storage.payloads import MiB, calling, chunked, failing, payload, read_all, sha256
from tests.storage.servers import Server


class FlakyLink:
    """A TCP relay on loopback to a server. `cut()` drops every connection and turns new ones
    away (noting the request line each one sent) until `restore()`, as a network outage would;
    the server behind keeps its state."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.up = True
        self.turned_away: list[bytes] = []
        self._ends: set[asyncio.StreamWriter] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            with contextlib.suppress(Exception):
                self.turned_away.append(await asyncio.wait_for(reader.readline(), 5))
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(servers.HOST, self.port)
        ends = {writer, up_writer}
        self._ends |= ends
        pipes = [
            asyncio.create_task(_pipe(reader, up_writer)),
            asyncio.create_task(_pipe(up_reader, writer)),
        ]
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for end in ends:
            end.transport.abort()
        await asyncio.gather(*pipes, return_exceptions=True)
        self._ends -= ends

    def cut(self) -> None:
        self.up = False
        for end in self._ends:
            end.transport.abort()

    def restore(self) -> None:
        self.up = True


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()


@pytest.fixture
async def flaky_moto(moto_server: Server) -> AsyncIterator[tuple[FlakyLink, dict[str, object]]]:
    """A link to the moto server that can fail, and a driver config that goes through it."""
    link = FlakyLink(moto_server.port)
    relay = await asyncio.start_server(link.serve, servers.HOST, 0)
    port = relay.sockets[0].getsockname()[1]
    yield link, {**moto_server.config, "endpoint_url": f"http://{servers.HOST}:{port}"}
    relay.close()
    link.cut()


@pytest.fixture
def doomed_rclone() -> Iterator[Server]:
    server = servers.start_rclone_s3()
    yield server
    server.stop()


async def test_large_object_with_default_part_size_round_trips_on_rclone(
    rclone_server: Server, uid: str
) -> None:
    data = payload(40 * MiB + 5, seed=10)  # three 16 MiB parts
    driver = get_driver("s3", rclone_server.config)
    key = f"{uid}/c/b/vda.qcow2"

    result = await driver.put(key, chunked(data, 8 * MiB))

    assert result.sha256 == sha256(data)
    stored = rclone_server.data_dir / "backups" / key
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == sha256(data)
    assert sha256(await read_all(driver, key)) == sha256(data)
    await driver.close()


async def test_failed_multipart_upload_is_aborted_on_moto(moto_server: Server, uid: str) -> None:
    driver = get_driver("s3", {**moto_server.config, "part_size": 5 * MiB})
    source = failing(payload(20 * MiB), after=17 * MiB, error=OSError("read error"))

    with pytest.raises(OSError, match="read error"):
        await driver.put(f"{uid}/vda.qcow2", source)

    uploads = servers.s3_admin(moto_server).list_multipart_uploads(Bucket="backups")
    assert [u for u in uploads.get("Uploads", []) if uid in u["Key"]] == []
    await driver.close()


async def test_abort_failed_by_a_dropped_connection_is_retried_until_it_goes_through(
    flaky_moto: tuple[FlakyLink, dict[str, object]],
    moto_server: Server,
    uid: str,
) -> None:
    link, config = flaky_moto
    driver = get_driver("s3", {**config, "part_size": 5 * MiB})
    source = calling(payload(30 * MiB, seed=12), at=12 * MiB, action=link.cut)
    put = asyncio.create_task(driver.put(f"{uid}/vda.qcow2", source))

    async with asyncio.timeout(60):
        while not any(line.startswith(b"DELETE ") for line in link.turned_away):
            assert not put.done(), "the upload ended before trying to abort"
            await asyncio.sleep(0.02)
    # The first abort was turned away. botocore makes 4 attempts at a call (max_attempts counts
    # retries) with jittered backoff of at most 1 + 2 + 4 s, which would bridge a shorter
    # outage on their own; after 8 s, only a retry of the driver's own reaches the server.
    await asyncio.sleep(8)
    link.restore()

    with pytest.raises(StorageUnreachable):
        await put
    uploads = servers.s3_admin(moto_server).list_multipart_uploads(Bucket="backups")
    assert [u["Key"] for u in uploads.get("Uploads", []) if uid in u["Key"]] == []
    await driver.close()


async def test_prefix_keeps_objects_under_it_and_keys_relative(
    moto_server: Server, uid: str
) -> None:
    driver = get_driver("s3", {**moto_server.config, "prefix": f"/tenant-{uid}/"})

    await driver.put("a/b.qcow2", chunked(b"abc"))

    admin = servers.s3_admin(moto_server)
    listed = admin.list_objects_v2(Bucket="backups", Prefix=f"tenant-{uid}/")
    assert [o["Key"] for o in listed["Contents"]] == [f"tenant-{uid}/a/b.qcow2"]
    assert [o.key for o in await driver.list("")] == ["a/b.qcow2"]
    await driver.close()


async def test_check_reports_a_missing_bucket(moto_server: Server) -> None:
    driver = get_driver("s3", {**moto_server.config, "bucket": "no-such-bucket"})

    result = await driver.check()

    assert not result.ok
    assert result.error == "cannot connect to the storage server (the bucket does not exist)"
    assert result.detail is not None
    assert result.detail.startswith("S3 bucket 'no-such-bucket' does not exist at http://")
    await driver.close()


async def test_check_reports_rejected_credentials(rclone_server: Server) -> None:
    driver = get_driver("s3", {**rclone_server.config, "secret_access_key": "wrong-secret"})

    result = await driver.check()

    assert not result.ok
    assert result.error == "cannot connect to the storage server (credentials rejected)"
    assert result.detail is not None
    assert "S3 credentials rejected by http://127.0.0.1:" in result.detail
    assert "for bucket 'backups'" in result.detail
    await driver.close()


async def test_check_reports_an_unreachable_endpoint() -> None:
    port = servers.free_port()
    config = {**servers._s3_config(port, "backups"), "endpoint_url": f"http://127.0.0.1:{port}"}
    driver = get_driver("s3", config)

    result = await driver.check()

    assert not result.ok
    assert result.error is not None and "127.0.0.1" not in result.error
    assert result.error.startswith("cannot connect to the storage server (")
    assert result.detail is not None
    assert result.detail.startswith(f"cannot reach S3 endpoint http://127.0.0.1:{port}")
    await driver.close()


async def test_server_killed_mid_upload_raises_unreachable_and_leaves_nothing(
    doomed_rclone: Server, uid: str
) -> None:
    driver = get_driver("s3", {**doomed_rclone.config, "part_size": 5 * MiB})
    source = calling(payload(30 * MiB, seed=11), at=12 * MiB, action=doomed_rclone.kill)

    with pytest.raises(
        StorageUnreachable, match=re.escape("cannot reach S3 endpoint http://127.0.0.1")
    ):
        await driver.put(f"{uid}/vda.qcow2", source)

    await driver.close()
    # rclone keeps unfinished multipart state on disk, which nobody could abort while the
    # server was dead; what matters is that no object is visible once it is back.
    revived = servers.start_rclone_s3(data_dir=doomed_rclone.data_dir)
    try:
        driver = get_driver("s3", revived.config)
        assert await driver.list(f"{uid}/") == []
        with pytest.raises(ObjectNotFound):
            await driver.stat(f"{uid}/vda.qcow2")
        await driver.close()
    finally:
        revived.kill()
        revived.log.unlink(missing_ok=True)


async def test_unfinished_uploads_list_empty_where_rclone_knows_none(
    doomed_rclone: Server, uid: str
) -> None:
    """rclone answers the listing with NoSuchUpload while it holds no upload of the bucket
    (none since it started): that is an empty list, not a storage error the reconciliation
    stops on. A missing bucket or a wrong key is still an error."""
    driver = get_driver("s3", doomed_rclone.config)
    assert await driver.partial_uploads("") == []
    servers.s3_admin(doomed_rclone).create_multipart_upload(Bucket="backups", Key=f"{uid}/v")
    assert [u.key for u in await driver.partial_uploads("")] == [f"{uid}/v"]
    await driver.close()

    doomed_rclone.restart()  # same port and data; the upload is forgotten
    assert await driver.partial_uploads(f"{uid}/") == []
    await driver.close()
    for wrong in ({"bucket": "no-such-bucket"}, {"secret_access_key": "wrong-secret"}):
        other = get_driver("s3", {**doomed_rclone.config, **wrong})
        with pytest.raises(StorageUnreachable):
            await other.partial_uploads("")
        await other.close()


@pytest.mark.parametrize(
    "error",
    [
        EndpointConnectionError(
            endpoint_url="http://127.0.0.1:9000/backups/i/c/b/vda.qcow2?uploadId=2~Qx7-a.b&partNumber=3"
        ),
        ConnectionClosedError(
            endpoint_url="https://backups.s3.amazonaws.com/i/c/b/vda.qcow2?X-Amz-Algorithm=AWS4-HMAC"
            "-SHA256&X-Amz-Credential=AKIA%2F20250101&X-Amz-Signature=0123abcd"
        ),
        ClientError(
            {"Error": {"Code": "InternalError", "Message": "failed for UploadId: 2~Qx7-a.b"}},
            "UploadPart",
        ),
    ],
)
def test_error_texts_carry_no_url_query_and_no_upload_id(error: Exception) -> None:
    driver = get_driver("s3", servers._s3_config(9000, "backups"))

    text = str(driver._translate(error, "upload of part 3", "i/c/b/vda.qcow2"))

    assert "uploadid" not in text.lower()
    assert "2~Qx7" not in text
    assert "X-Amz-" not in text
    assert "partNumber" not in text
    if not isinstance(error, ClientError):
        assert '/i/c/b/vda.qcow2"' in text  # the URL keeps scheme, host and path


async def test_get_of_missing_key_names_the_bucket(moto_server: Server, uid: str) -> None:
    driver = get_driver("s3", moto_server.config)

    with pytest.raises(
        ObjectNotFound, match=re.escape(f"{uid}/x not found in S3 bucket 'backups'")
    ):
        await read_all(driver, f"{uid}/x")
    await driver.close()
