"""The NBD client against real servers: qemu-nbd and nbdkit on unix sockets in tmp_path."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.virt.nbd import (
    MAX_READ,
    STATE_DIRTY,
    STATE_HOLE,
    STATE_ZERO,
    Extent,
    NbdClient,
    NbdDisconnected,
    NbdError,
)

KiB = 1024
MiB = 1024 * KiB


@dataclass
class Server:
    sock: str
    proc: subprocess.Popen[bytes]
    log: Path


Serve = Callable[..., Server]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """Start ``qemu-nbd ...`` or ``nbdkit ...`` on a fresh unix socket; killed at teardown."""
    started: list[Server] = []

    def start(program: str, *args: str) -> Server:
        sock = tmp_path / f"nbd{len(started)}.sock"
        log = tmp_path / f"nbd{len(started)}.log"
        if program == "qemu-nbd":
            cmd = ["qemu-nbd", "--persistent", "--shared=4", "-k", str(sock), *args]
        else:
            cmd = ["nbdkit", "--foreground", "-U", str(sock), *args]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        server = Server(str(sock), proc, log)
        started.append(server)
        _wait_listening(server)
        return server

    yield start
    for server in started:
        server.proc.kill()
        server.proc.wait()


def _wait_listening(server: Server) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"NBD server exited early: {server.log.read_text()}")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(server.sock)
                return
            except OSError:
                time.sleep(0.02)
    pytest.fail(f"NBD server did not listen on {server.sock}: {server.log.read_text()}")


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _qcow2(path: Path, size: int, *writes: str) -> Path:
    """A qcow2 image with 64 KiB clusters, then ``qemu-io -c WRITE`` for each write."""
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size))
    if writes:
        _run("qemu-io", "-f", "qcow2", *[a for w in writes for a in ("-c", w)], str(path))
    return path


def _assert_covers(extents: list[Extent], offset: int, end: int) -> None:
    """Contiguous, non-empty, clipped to [offset, end), adjacent extents differ."""
    assert extents, "no extents"
    assert extents[0].offset == offset
    for a, b in itertools.pairwise(extents):
        assert a.offset + a.length == b.offset, (a, b)
        assert a.flags != b.flags, f"unmerged {a} {b}"
    assert all(e.length > 0 for e in extents)
    assert extents[-1].offset + extents[-1].length == end


def _flags(extents: list[Extent], start: int, end: int) -> set[int]:
    """The flags of every extent touching [start, end)."""
    return {e.flags for e in extents if e.offset < end and e.offset + e.length > start}


def _ranges(extents: list[Extent], flag: int) -> list[tuple[int, int]]:
    return [(e.offset, e.offset + e.length) for e in extents if e.flags & flag]


async def test_qemu_nbd_reads_match_the_file(serve: Serve, tmp_path: Path) -> None:
    size = 3 * MiB + 3 * 64 * KiB + 1536  # not a multiple of 64 KiB
    data = random.Random(7).randbytes(size)
    (tmp_path / "disk.raw").write_bytes(data)
    server = serve("qemu-nbd", "-r", "-f", "raw", "-x", "disk", str(tmp_path / "disk.raw"))

    async with await NbdClient.connect(server.sock, "disk") as client:
        assert client.size == size
        assert client.contexts == ()
        tail = size - size % (64 * KiB)
        pieces = [
            (0, 1),
            (1, 1),
            (12345, 70001),
            (65535, 2),
            (MiB - 3, MiB + 7),
            (tail, size - tail),  # the final partial piece
            (size - 1, 1),
            (size - 200_001, 200_001),
        ]
        got = await asyncio.gather(*(client.read(o, n) for o, n in pieces))
        for (offset, length), chunk in zip(pieces, got, strict=True):
            assert chunk == data[offset : offset + length], (offset, length)

        # The whole export, 256 KiB at a time, all requests in flight at once.
        step = 256 * KiB
        chunks = await asyncio.gather(
            *(client.read(o, min(step, size - o)) for o in range(0, size, step))
        )
        assert b"".join(chunks) == data

        with pytest.raises(NbdError, match=f"has {size} bytes"):
            await client.read(size - 10, 11)
        with pytest.raises(NbdError, match="at most"):
            await client.read(0, MAX_READ + 1)
        assert await client.read(5, 0) == b""
        # The connection is still fine after refused arguments.
        assert await client.read(size - 3, 3) == data[-3:]


async def test_qemu_nbd_base_allocation_and_allocation_depth(serve: Serve, tmp_path: Path) -> None:
    size = 8 * MiB
    image = _qcow2(
        tmp_path / "disk.qcow2",
        size,
        "write -P 0x11 0 1M",  # data
        "write -P 0x22 2M 1M",
        "write -z 2304k 512k",  # zeroed over data
        "write -z 5M 1M",  # zeroed where nothing was written
    )
    server = serve("qemu-nbd", "-r", "-f", "qcow2", "-A", str(image))
    async with await NbdClient.connect(
        server.sock, "", ["base:allocation", "qemu:allocation-depth"]
    ) as client:
        assert client.contexts == ("base:allocation", "qemu:allocation-depth")
        status = await client.block_status()
        allocation, depth = status["base:allocation"], status["qemu:allocation-depth"]
        _assert_covers(allocation, 0, size)
        _assert_covers(depth, 0, size)

        data = [(0, 1 * MiB), (2 * MiB, 2304 * KiB), (2816 * KiB, 3 * MiB)]
        zeroed = [(2304 * KiB, 2816 * KiB), (5 * MiB, 6 * MiB)]
        untouched = [(1 * MiB, 2 * MiB), (3 * MiB, 5 * MiB), (6 * MiB, size)]
        assert _ranges(allocation, STATE_HOLE | STATE_ZERO) == [
            (1 * MiB, 2 * MiB),
            (2304 * KiB, 2816 * KiB),
            (3 * MiB, size),
        ]
        for start, end in data:
            assert _flags(allocation, start, end) == {0}
        for start, end in zeroed + untouched:
            assert _flags(allocation, start, end) == {STATE_HOLE | STATE_ZERO}
        # Only the allocation depth tells a zeroed cluster from one never written.
        for start, end in data + zeroed:
            assert _flags(depth, start, end) == {1}
        for start, end in untouched:
            assert _flags(depth, start, end) == {0}

        # A sub-range is clipped to the range asked.
        part = await client.block_status(MiB - 5, MiB + 10)
        assert part["base:allocation"] == [
            Extent(MiB - 5, 5, 0),
            Extent(MiB, MiB, STATE_HOLE | STATE_ZERO),
            Extent(2 * MiB, 5, 0),
        ]
        # QEMU answers zeroed ranges with hole chunks; read buffers are reused, so a hole
        # after data must still come back as zeros.
        assert await client.read(0, MiB) == b"\x11" * MiB
        assert await client.read(2 * MiB, MiB) == b"".join(
            [b"\x22" * (256 * KiB), bytes(512 * KiB), b"\x22" * (256 * KiB)]
        )
        assert await client.read(2304 * KiB - 2, 4) == b"\x22\x22\0\0"


def _round_out(start: int, end: int, granularity: int) -> tuple[int, int]:
    return start // granularity * granularity, -(-end // granularity) * granularity


async def test_qemu_nbd_dirty_bitmap(serve: Serve, tmp_path: Path) -> None:
    size, granularity = 16 * MiB, 128 * KiB
    image = _qcow2(tmp_path / "disk.qcow2", size)
    _run("qemu-img", "bitmap", "--add", "-g", str(granularity), str(image), "bm0")
    writes = [(70000, 100_000), (4 * MiB, 64 * KiB), (10 * MiB + 1, 1 * MiB)]
    # qemu-io opens the image with its enabled persistent bitmap, which records the writes.
    _run("qemu-io", "-f", "qcow2", *[f"-cwrite -P 5 {o} {n}" for o, n in writes], str(image))

    server = serve("qemu-nbd", "-r", "-f", "qcow2", "-B", "bm0", str(image))
    async with await NbdClient.connect(
        server.sock, "", ["qemu:dirty-bitmap:bm0", "base:allocation"]
    ) as client:
        assert client.contexts == ("qemu:dirty-bitmap:bm0", "base:allocation")
        status = await client.block_status()
        dirty = status["qemu:dirty-bitmap:bm0"]
        _assert_covers(dirty, 0, size)
        _assert_covers(status["base:allocation"], 0, size)
        expected = [_round_out(o, o + n, granularity) for o, n in writes]
        assert expected == [
            (0, 256 * KiB),
            (4 * MiB, 4 * MiB + 128 * KiB),
            (10 * MiB, 11 * MiB + 128 * KiB),
        ]
        assert _ranges(dirty, STATE_DIRTY) == expected
        # Clean and dirty alternate; clean extents have no flags.
        assert {e.flags for e in dirty} == {0, STATE_DIRTY}


async def test_block_status_answered_in_pieces(serve: Serve) -> None:
    size = 16 * MiB + 12345
    # nbdkit's data plugin allocates 32 KiB pages; 64 KiB of data straddle the 1 MiB mark.
    data = f"1 @{MiB - 32 * KiB} (2)*{64 * KiB} @{8 * MiB} 3 @{size - 1} 4"
    whole = serve("nbdkit", "data", f"data={data}", f"size={size}")
    pieces = serve(
        "nbdkit", "--filter=blocksize", "data", f"data={data}", f"size={size}", "maxlen=1M"
    )

    async with await NbdClient.connect(whole.sock, "", ["base:allocation"]) as client:
        reference = (await client.block_status())["base:allocation"]
        assert client.block_status_requests == 1
    _assert_covers(reference, 0, size)
    assert _ranges(reference, STATE_HOLE) == [
        (32 * KiB, MiB - 32 * KiB),
        (MiB + 32 * KiB, 8 * MiB),
        (8 * MiB + 32 * KiB, 16 * MiB),
    ]

    async with await NbdClient.connect(pieces.sock, "", ["base:allocation"]) as client:
        extents = (await client.block_status())["base:allocation"]
        # The filter answers at most 1 MiB per request.
        assert client.block_status_requests == 17
        assert extents == reference  # merged across answers, e.g. the data at 1 MiB

        client.block_status_requests = 0
        part = (await client.block_status(1000, 3 * MiB))["base:allocation"]
        assert client.block_status_requests > 1
        assert part == [
            # Only byte 0 of the first page is data: the rest of it reads as zeros.
            Extent(1000, 32 * KiB - 1000, STATE_ZERO),
            Extent(32 * KiB, MiB - 64 * KiB, STATE_HOLE | STATE_ZERO),
            Extent(MiB - 32 * KiB, 64 * KiB, 0),
            Extent(MiB + 32 * KiB, 2 * MiB - 32 * KiB + 1000, STATE_HOLE | STATE_ZERO),
        ]
        assert await client.read(MiB - 1, 2) == b"\x02\x02"


async def test_server_killed_during_reads(serve: Serve) -> None:
    server = serve("nbdkit", "--filter=delay", "pattern", "size=16M", "rdelay=20")
    client = await NbdClient.connect(server.sock, "")
    reads = [asyncio.ensure_future(client.read(o, 64 * KiB)) for o in range(0, MiB, 256 * KiB)]
    await asyncio.sleep(0.3)  # the requests reach nbdkit, which sits on them
    assert not any(r.done() for r in reads)
    server.proc.kill()

    results = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 5)
    for offset, result in zip(range(0, MiB, 256 * KiB), results, strict=True):
        assert isinstance(result, NbdDisconnected), result
        assert f"closed the connection during a read at offset {offset} " in str(result)
    with pytest.raises(NbdDisconnected, match="closed the connection"):
        await asyncio.wait_for(client.read(0, 10), 5)
    await client.close()
    await client.close()


async def test_server_that_fails_reads(serve: Serve) -> None:
    server = serve(
        "nbdkit", "--filter=error", "pattern", "size=1M", "error=EIO", "error-pread-rate=100%"
    )
    async with await NbdClient.connect(server.sock, "", ["base:allocation"]) as client:
        results = await asyncio.gather(
            client.read(4096, 512), client.read(0, 10), return_exceptions=True
        )
        for result in results:
            assert type(result) is NbdError, result
        assert "failed a read at offset 4096 (length 512): EIO" in str(results[0])
        # An error reply leaves the connection usable.
        status = await client.block_status()
        assert status["base:allocation"] == [Extent(0, MiB, 0)]


async def test_refusals_name_what_was_refused(serve: Serve, tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "disk.qcow2", MiB)
    server = serve("qemu-nbd", "-r", "-f", "qcow2", "-x", "vda", str(image))

    with pytest.raises(NbdError, match="no export named 'vdb'") as err:
        await NbdClient.connect(server.sock, "vdb")
    assert not isinstance(err.value, NbdDisconnected)
    with pytest.raises(NbdError, match="meta context qemu:dirty-bitmap:nope"):
        await NbdClient.connect(server.sock, "vda", ["base:allocation", "qemu:dirty-bitmap:nope"])
    with pytest.raises(NbdDisconnected, match="cannot connect"):
        await NbdClient.connect(str(tmp_path / "missing.sock"), "vda")

    # The server is still fine after those.
    async with await NbdClient.connect(server.sock, "vda", ["base:allocation"]) as client:
        assert client.size == MiB
        with pytest.raises(NbdError, match="has 1048576 bytes"):
            await client.block_status(1, MiB)
        assert await client.block_status() == {"base:allocation": [Extent(0, MiB, 3)]}


async def test_nbdkit_file_reads_and_allocation(serve: Serve, tmp_path: Path) -> None:
    size = 8 * MiB + 777
    path = tmp_path / "sparse.raw"
    rng = random.Random(3)
    written = [(0, 100_000), (3 * MiB + 5, 5000), (size - 300, 300)]
    with path.open("wb") as f:
        f.truncate(size)
        for offset, length in written:
            f.seek(offset)
            f.write(rng.randbytes(length))
    data = path.read_bytes()
    server = serve("nbdkit", "-r", "file", str(path))

    async with await NbdClient.connect(server.sock, "", ["base:allocation"]) as client:
        assert client.size == size
        got = await asyncio.gather(*(client.read(o, n) for o, n in written))
        assert got == [data[o : o + n] for o, n in written]
        assert (
            b"".join(
                await asyncio.gather(
                    *(client.read(o, min(MiB, size - o)) for o in range(0, size, MiB))
                )
            )
            == data
        )

        allocation = (await client.block_status())["base:allocation"]
        _assert_covers(allocation, 0, size)
        for offset, length in written:
            assert _flags(allocation, offset, offset + length) == {0}
        # Holes as the filesystem reports them (block-sized), well away from the data.
        for start, end in [(MiB, 3 * MiB), (4 * MiB, 8 * MiB)]:
            assert _flags(allocation, start, end) == {STATE_HOLE | STATE_ZERO}
        assert os.stat(path).st_blocks * 512 < MiB  # the file really is sparse
