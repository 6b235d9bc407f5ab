"""Local/NFS specifics, the file stream helpers and the registry."""

from __future__ import annotations

import fcntl
import mmap
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.storage import (
    StorageFull,
    StorageUnreachable,
    get_driver,
    iter_file,
    pipeline,
    write_stream_to_file,
)
from app.storage.base import validate_key
from app.storage.local import LocalDriver, NfsDriver
from tests.storage.conftest import mounted_tmpfs
from tests.storage.payloads import MiB, chunked, payload, sha256


async def test_nfs_check_fails_clearly_when_the_share_is_not_mounted(tmp_path: Path) -> None:
    driver = get_driver("nfs", {"path": str(tmp_path), "server": "nas1", "export": "/backups"})

    result = await driver.check()

    assert not result.ok
    assert result.error == "cannot connect to the storage server (the NFS share is not mounted)"
    assert result.detail == (
        f"{tmp_path} is not a mount point; is the NFS share (nas1:/backups) mounted?"
    )
    with pytest.raises(StorageUnreachable, match="is not a mount point"):
        await driver.put("a/b", chunked(b"x"))
    assert os.listdir(tmp_path) == []


async def test_local_check_fails_clearly_when_the_directory_is_missing(tmp_path: Path) -> None:
    result = await get_driver("local", {"path": str(tmp_path / "nope")}).check()

    assert result.error == (
        "cannot connect to the storage server (the storage directory does not exist)"
    )
    assert result.detail == f"storage directory {tmp_path / 'nope'} does not exist"


async def test_full_disk_raises_storage_full_and_leaves_no_temp_file() -> None:
    with mounted_tmpfs("2m") as point:
        driver = get_driver("nfs", {"path": str(point)})

        with pytest.raises(StorageFull, match="no space left"):
            await driver.put("i/c/b/vda.qcow2", chunked(payload(4 * MiB)))

        assert [p for p in point.rglob("*") if p.is_file()] == []


async def test_iter_file_and_write_stream_to_file_round_trip(tmp_path: Path) -> None:
    data = payload(5 * MiB + 3, seed=40)
    (tmp_path / "src").write_bytes(data)

    chunks = [c async for c in iter_file(tmp_path / "src", chunk_size=MiB)]
    result = await write_stream_to_file(iter_file(tmp_path / "src", MiB), tmp_path / "d/dst")

    assert [len(c) for c in chunks] == [MiB] * 5 + [3]
    assert (result.size, result.sha256) == (len(data), sha256(data))
    assert (tmp_path / "d/dst").read_bytes() == data
    assert sorted(os.listdir(tmp_path / "d")) == ["dst"]


@pytest.mark.parametrize("direct", [True, False])
async def test_a_stream_is_written_direct_or_buffered_with_an_unaligned_tail(
    tmp_path: Path, direct: bool
) -> None:
    # Whole blocks (as a qcow2 stream's pieces are) and a tail: the tail goes through the cache.
    data = payload(2 * 4 * MiB + 4096 * 3 + 17, seed=43)
    pieces = [data[: 4 * MiB], data[4 * MiB : 8 * MiB], data[8 * MiB :]]

    async def stream() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    result = await write_stream_to_file(stream(), tmp_path / "dst", direct=direct)

    assert (result.size, result.sha256) == (len(data), sha256(data))
    assert (tmp_path / "dst").read_bytes() == data


def test_a_direct_write_the_kernel_refuses_goes_through_the_cache(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        writer = pipeline.StreamWriter(fd, direct=True)
        assert writer.direct
        # Memory that does not start on a block boundary: the kernel refuses it with EINVAL.
        block = mmap.mmap(-1, 4 * 4096)
        assert writer._write_direct(memoryview(block)[1 : 1 + 4096]) == 0
        writer.write(b"x" * 4096 + b"tail")
        assert not writer.direct
    finally:
        os.close(fd)

    assert (tmp_path / "f").read_bytes() == b"x" * 4096 + b"tail"


def test_local_storage_writes_past_the_page_cache_where_the_filesystem_allows(
    tmp_path: Path,
) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        assert pipeline.StreamWriter(fd, direct=True).direct  # ext4 here: direct I/O is on
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    assert LocalDriver.direct_io and not NfsDriver.direct_io


# The last size goes round the ring of read buffers more than once: a buffer read into again
# before its hash was done would change the digest.
@pytest.mark.parametrize(
    "size", [0, 3, pipeline.HASH_READ * 2 + 123, pipeline.HASH_READ * (pipeline.HASH_DEPTH * 3) + 5]
)
def test_sha256_of_a_file_matches_hashing_its_bytes(tmp_path: Path, size: int) -> None:
    data = payload(size, seed=45)
    (tmp_path / "f").write_bytes(data)

    assert pipeline.sha256_of(tmp_path / "f") == sha256(data)


async def test_a_stream_larger_than_the_room_left_leaves_no_temporary_file() -> None:
    with mounted_tmpfs("4m") as point:
        data = payload(24 * MiB)
        driver = LocalDriver({"path": str(point)})

        with pytest.raises(StorageFull, match="no space left"):
            await driver.put("i/c/b/vda.qcow2", chunked(data), size=len(data))

        assert [p for p in point.rglob("*") if p.is_file()] == []


async def test_iter_file_closes_the_file_when_the_consumer_stops_early(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(payload(3 * MiB))
    stream = iter_file(tmp_path / "src", MiB)

    assert len(await anext(stream)) == MiB
    await stream.aclose()  # must not hang on the read-ahead or leak the file


def test_registry_builds_each_kind_and_rejects_unknown_ones(tmp_path: Path) -> None:
    assert type(get_driver("local", {"path": str(tmp_path)})) is LocalDriver
    assert type(get_driver("nfs", {"path": str(tmp_path)})) is NfsDriver
    with pytest.raises(ValueError, match="unknown storage kind 'tape'"):
        get_driver("tape", {})
    with pytest.raises(ValueError, match="missing 'bucket'"):
        get_driver("s3", {"access_key_id": "a", "secret_access_key": "b"})


def test_importing_the_package_loads_no_client_library() -> None:
    libs = "{'aioboto3', 'asyncssh', 'aioftp'}"
    code = f"import sys, app.storage; print(sorted({libs} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("good", ["a", "i-1/c-2/b-3/vda.qcow2", "x..y/z", ".hidden"])
def test_ordinary_keys_are_accepted(good: str) -> None:
    assert validate_key(good) == good
