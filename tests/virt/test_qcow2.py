"""The streamed qcow2 writer against the real qemu-img: check clean, compare equal, chains of 4+.

No VM: a raw file plays the source disk. Every image is written front to back by ``emit`` and
judged by ``qemu-img check`` and ``qemu-img compare``; the metadata is also parsed back here,
independently of the writer, for layouts too large to write.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import subprocess
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from pathlib import Path
from typing import cast

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from app.virt.qcow2 import CLUSTER, Layout, ShortRead, emit, plan
from tests.virt.helpers import run_async

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
L2_SPAN = 512 * MiB  # guest bytes one L2 table maps
COPIED = 1 << 63
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00

PROFILE = settings(deadline=None, derandomize=True, database=None)

Op = tuple[str, int, int, int]  # ("write" | "zero", offset, length, seed)


# --- helpers -------------------------------------------------------------------------------------


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", *map(str, args)], capture_output=True, text=True, check=False
    )


def assert_check_clean(img: Path) -> None:
    proc = qemu_img("check", "-f", "qcow2", img)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No errors were found" in proc.stdout, proc.stdout


def same_as_raw(raw: Path, img: Path) -> bool:
    proc = qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, img)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return proc.returncode == 0


async def _write(layout: Layout, source: Path, out: Path, piece: int, depth: int) -> None:
    fd = os.open(source, os.O_RDONLY)

    async def read(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    try:
        with out.open("wb") as f:
            async for chunk in emit(layout, read, piece=piece, depth=depth):
                f.write(chunk)
    finally:
        os.close(fd)


def write_image(
    layout: Layout, source: Path, out: Path, piece: int = 4 * MiB, depth: int = 4
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    run_async(_write(layout, source, out, piece, depth))
    assert out.stat().st_size == layout.size


def cluster_ranges(clusters: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted cluster numbers as (first, end) groups of consecutive clusters."""
    out: list[tuple[int, int]] = []
    for c in sorted(clusters):
        if out and out[-1][1] == c:
            out[-1] = (out[-1][0], c + 1)
        else:
            out.append((c, c + 1))
    return out


class Disk:
    """A raw file standing for the VM's disk, with the clusters written since the last backup."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        with path.open("wb") as f:
            f.truncate(size)
        self.dirty: set[int] = set()

    def apply(self, op: Op) -> None:
        kind, offset, length, seed = op
        length = min(length, self.size - offset)
        payload = bytes(length) if kind == "zero" else random.Random(seed).randbytes(length)
        with self.path.open("r+b") as f:
            f.seek(offset)
            f.write(payload)
        # A dirty bitmap with 64 KiB granularity.
        self.dirty.update(range(offset // CLUSTER, (offset + length - 1) // CLUSTER + 1))

    def split(self, clusters: Iterable[int]) -> tuple[list[int], list[int]]:
        """The clusters that hold data now, and those reading as zeros."""
        data: list[int] = []
        zero: list[int] = []
        with self.path.open("rb") as f:
            for c in sorted(clusters):
                f.seek(c * CLUSTER)
                chunk = f.read(CLUSTER)
                (zero if chunk.count(0) == len(chunk) else data).append(c)
        return data, zero

    def take_dirty(self) -> set[int]:
        dirty, self.dirty = self.dirty, set()
        return dirty


def byte_ranges(
    groups: list[tuple[int, int]], size: int, rnd: random.Random, outward: bool
) -> list[tuple[int, int]]:
    """Cluster groups as byte ranges, unaligned on purpose: shrunk inside their first and last
    cluster (plan rounds data outward), or grown into the neighbours (it rounds zero inward)."""
    out = []
    for first, end in groups:
        a, b = first * CLUSTER, min(end * CLUSTER, size)
        if outward:
            a -= rnd.randrange(min(a, CLUSTER - 1) + 1)
            if b < size:  # reaching the end of the disk would take in the partial last cluster
                b += rnd.randrange(min(size - b - 1, CLUSTER - 1) + 1)
        elif end - first == 1:
            a, b = a + rnd.randrange((b - a) // 2), b - rnd.randrange((b - a) // 2)
        else:
            a, b = a + rnd.randrange(CLUSTER), b - rnd.randrange(b - (end - 1) * CLUSTER)
        out.append((a, b - a))
    rnd.shuffle(out)
    return out


def backup_ranges(
    disk: Disk, clusters: Iterable[int], rnd: random.Random, zero_mode: str
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """plan()'s data and zero arguments for ``clusters``: data where they hold data now, zero
    where they read as zeros ("exact"), or zero over all of them so data must win ("over")."""
    data, zero = disk.split(clusters)
    zero_src = list(clusters) if zero_mode == "over" else zero
    return (
        byte_ranges(cluster_ranges(data), disk.size, rnd, outward=False),
        byte_ranges(cluster_ranges(zero_src), disk.size, rnd, outward=True),
    )


# --- parsing the metadata back, independently of the writer ---------------------------------------


def parse(layout: Layout, meta: bytes) -> dict[int, int]:
    """Check the metadata's structure and refcounts; return guest cluster -> raw L2 entry."""
    (magic, version, name_off, name_len, bits, vsize, crypt, l1_size, l1_off, rt_off, rt_clusters,
     nb_snap, _snap_off, incompat, compat, autoclear, rorder, hlen) = struct.unpack_from(
        ">4sIQIIQIIQQIIQQQQII", meta
    )  # fmt: skip
    assert (magic, version, bits, crypt, nb_snap, rorder, hlen) == (b"QFI\xfb", 3, 16, 0, 0, 4, 104)
    assert (incompat, compat, autoclear) == (0, 0, 0)
    assert vsize == layout.virtual_size
    assert l1_size == -(-layout.virtual_size // L2_SPAN)
    if layout.backing is None:
        assert (name_off, name_len) == (0, 0)
        assert meta[104:112] == bytes(8)  # the end of the extensions, right away
    else:
        assert meta[name_off : name_off + name_len].decode() == layout.backing
        assert struct.unpack_from(">II", meta, 104) == (0xE2792ACA, 5)
        assert meta[112:117] == b"qcow2"
        assert struct.unpack_from(">II", meta, 120) == (0, 0)
        assert name_off + name_len <= CLUSTER
    assert len(meta) == layout.data_start
    clusters = layout.size // CLUSTER
    owners: dict[int, str] = {}

    def own(offset: int, what: str) -> None:
        assert offset % CLUSTER == 0 and 0 <= offset < layout.size, (what, offset)
        assert offset // CLUSTER not in owners, (what, offset, owners.get(offset // CLUSTER))
        owners[offset // CLUSTER] = what

    own(0, "header")
    for i in range(-(-l1_size * 8 // CLUSTER)):
        own(l1_off + i * CLUSTER, "l1")
    for i in range(rt_clusters):
        own(rt_off + i * CLUSTER, "refcount table")
    refcounts: list[int] = []
    for i in range(rt_clusters * CLUSTER // 8):
        (block,) = struct.unpack_from(">Q", meta, rt_off + i * 8)
        if block:
            own(block, "refcount block")
            refcounts += struct.unpack_from(">32768H", meta, block)
    assert len(refcounts) >= clusters
    assert refcounts[:clusters] == [1] * clusters
    assert not any(refcounts[clusters:])
    mapping: dict[int, int] = {}
    for i in range(l1_size):
        (entry,) = struct.unpack_from(">Q", meta, l1_off + i * 8)
        if not entry:
            continue
        assert entry & COPIED and not entry & ~(COPIED | OFFSET_MASK)
        l2 = entry & OFFSET_MASK
        own(l2, "l2")
        for j, e in enumerate(struct.unpack_from(">8192Q", meta, l2)):
            if e == 1:  # reads as zeros, no cluster behind it
                mapping[i * 8192 + j] = e
            elif e:
                assert e & COPIED and not e & ~(COPIED | OFFSET_MASK), hex(e)
                assert e & OFFSET_MASK >= layout.data_start
                own(e & OFFSET_MASK, "data")
                mapping[i * 8192 + j] = e
    assert sorted(owners) == list(range(clusters)), "every cluster is used exactly once"
    return mapping


def expected_mapping(layout: Layout) -> dict[int, int]:
    """Guest cluster -> L2 entry: data clusters back to back in guest order, then zero flags."""
    out: dict[int, int] = {}
    host = layout.data_start
    for offset, length in layout.runs:
        for c in range(offset // CLUSTER, -(-(offset + length) // CLUSTER)):
            out[c] = host | COPIED
            host += CLUSTER
    for offset, length in layout.zeros:
        for c in range(offset // CLUSTER, -(-(offset + length) // CLUSTER)):
            assert c not in out
            out[c] = 1
    return out


def clusters_of(ranges: Iterable[tuple[int, int]], size: int, outward: bool) -> set[int]:
    out: set[int] = set()
    n = -(-size // CLUSTER)
    for offset, length in ranges:
        if outward:
            first, end = offset // CLUSTER, -(-(offset + length) // CLUSTER)
        else:
            first = -(-offset // CLUSTER)
            end = n if offset + length >= size else (offset + length) // CLUSTER
        out.update(range(first, min(end, n)))
    return out


# --- strategies ----------------------------------------------------------------------------------

# Multiples of 512: mostly not of 64 KiB (a partial last cluster), some aligned, some beyond one
# L2 table (> 512 MiB: unallocated space costs nothing).
sizes = st.one_of(
    st.integers(1, 6 * MiB // 512).filter(lambda n: n % 128).map(lambda n: n * 512),
    st.integers(1, 96).map(lambda n: n * CLUSTER),
    st.integers(L2_SPAN // 512 - 300, 3 * L2_SPAN // 512).map(lambda n: n * 512),
)


def ops(size: int, max_size: int = 8) -> st.SearchStrategy[list[Op]]:
    offsets = st.one_of(
        st.integers(0, size - 1),
        st.integers(max(0, size - 3 * CLUSTER), size - 1),  # the partial last cluster
        st.integers(0, size // L2_SPAN).map(lambda i: min(i * L2_SPAN, size - 1)),  # table edges
    )
    return st.lists(
        st.tuples(
            st.sampled_from(["write", "write", "zero"]),
            offsets,
            st.integers(1, 300 * KiB),
            st.integers(0, 2**32),
        ),
        min_size=1,
        max_size=max_size,
    )


def _size_kind(size: int) -> str:
    if size > L2_SPAN:
        return "several L2 tables"
    return "partial last cluster" if size % CLUSTER else "whole clusters"


pieces = st.sampled_from([512, 4096, 50_000, CLUSTER, 4 * MiB])


# --- the properties ------------------------------------------------------------------------------


@settings(PROFILE, max_examples=60)
@given(
    size=st.one_of(sizes, st.integers(1, 4 * TiB // 512).map(lambda n: n * 512)),
    data=st.lists(st.tuples(st.integers(0, 8 * MiB), st.integers(0, 3 * MiB)), max_size=6),
    zero=st.lists(st.tuples(st.integers(0, 8 * MiB), st.integers(0, 3 * MiB)), max_size=6),
    far=st.floats(0, 1),
    tail=st.integers(0, 300),
    backing=st.one_of(st.none(), st.text(min_size=1, max_size=40)),
)
def test_plan_rounds_and_maps_every_cluster(
    size: int,
    data: list[tuple[int, int]],
    zero: list[tuple[int, int]],
    far: float,
    tail: int,
    backing: str | None,
) -> None:
    # Some ranges far into the disk (other L2 tables), the rest near the start; a zero range
    # up to the end of the disk covers the partial last cluster.
    shift = int(far * size) // 512 * 512
    data = [(min(o + shift, size), n) for o, n in data]
    if tail:
        zero.append((max(0, size - tail * 512), tail * 512))
    layout = plan(size, data, zero, backing=backing)
    stored = clusters_of(data, size, outward=True)
    zeroed = clusters_of(zero, size, outward=False) - stored
    assert clusters_of(layout.runs, size, outward=True) == stored
    assert clusters_of(layout.zeros, size, outward=True) == zeroed
    assert [o for o, _ in layout.runs] == sorted(o for o, _ in layout.runs)
    assert all(o % CLUSTER == 0 for o, _ in (*layout.runs, *layout.zeros))
    assert all(o + n <= size for o, n in (*layout.runs, *layout.zeros))
    assert layout.data_bytes == sum(n for _, n in layout.runs)
    assert layout.size == layout.data_start + len(stored) * CLUSTER
    assert parse(layout, b"".join(layout.metadata())) == expected_mapping(layout)


@settings(PROFILE, max_examples=25)
@given(
    size=sizes,
    data=st.data(),
    zero_mode=st.sampled_from(["none", "exact", "over"]),
    piece=pieces,
    depth=st.integers(1, 4),
    seed=st.integers(0, 2**32),
)
def test_full_image_is_clean_and_equals_the_source(
    size: int, data: st.DataObject, zero_mode: str, piece: int, depth: int, seed: int
) -> None:
    event(_size_kind(size))
    with tempfile.TemporaryDirectory() as tmp:
        disk = Disk(Path(tmp) / "disk.raw", size)
        for op in data.draw(ops(size)):
            disk.apply(op)
        touched = disk.take_dirty()
        data_ranges, zero_ranges = backup_ranges(disk, touched, random.Random(seed), zero_mode)
        layout = plan(size, data_ranges, zero_ranges if zero_mode != "none" else ())
        img = Path(tmp) / "full.qcow2"
        write_image(layout, disk.path, img, piece, depth)
        assert_check_clean(img)
        assert same_as_raw(disk.path, img)


@settings(PROFILE, max_examples=20)
@given(
    size=sizes,
    data=st.data(),
    incrementals=st.integers(3, 5),
    siblings=st.booleans(),
    zero_mode=st.sampled_from(["exact", "over"]),
    seed=st.integers(0, 2**32),
)
def test_chain_of_incrementals_equals_the_source_at_each_point(
    size: int, data: st.DataObject, incrementals: int, siblings: bool, zero_mode: str, seed: int
) -> None:
    rnd = random.Random(seed)
    event("siblings" if siblings else "one directory")
    event(_size_kind(size))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        disk = Disk(root / "disk.raw", size)
        parent: str | None = None
        for step in range(incrementals + 1):
            for op in data.draw(ops(size, max_size=5)):
                disk.apply(op)
            dirty = disk.take_dirty()
            data_ranges, zero_ranges = backup_ranges(disk, dirty, rnd, zero_mode)
            # The storage layout <chain>/<backup>/vda.qcow2, or all files in one directory.
            name = f"b{step}/vda.qcow2" if siblings else f"b{step}.qcow2"
            backing = None if parent is None else ("../" if siblings else "") + parent
            layout = plan(size, data_ranges, zero_ranges, backing=backing)
            img = root / name
            write_image(layout, disk.path, img, rnd.choice([4096, CLUSTER, MiB]), rnd.randint(1, 4))
            assert_check_clean(img)
            assert same_as_raw(disk.path, img), f"step {step}"
            parent = name


# --- targeted cases ------------------------------------------------------------------------------


def test_a_dirty_cluster_that_now_reads_as_zero_hides_the_parent(tmp_path: Path) -> None:
    size = 4 * MiB + 3 * 512
    disk = Disk(tmp_path / "disk.raw", size)
    disk.apply(("write", 0, size, 1))
    disk.take_dirty()
    full = tmp_path / "b0" / "vda.qcow2"
    write_image(plan(size, [(0, size)]), disk.path, full)
    # The guest zeroes a cluster in the middle and the partial last one.
    disk.apply(("zero", 2 * CLUSTER, CLUSTER, 0))
    disk.apply(("zero", size // CLUSTER * CLUSTER, size % CLUSTER, 0))
    data, zero = disk.split(disk.take_dirty())
    assert data == [] and len(zero) == 2
    zero_ranges = [(c * CLUSTER, CLUSTER) for c in zero]

    # Left unallocated, the parent's old data shows through: the trap.
    leaky = tmp_path / "leaky" / "vda.qcow2"
    write_image(plan(size, [], backing="../b0/vda.qcow2"), disk.path, leaky)
    assert_check_clean(leaky)
    assert not same_as_raw(disk.path, leaky)

    inc = tmp_path / "b1" / "vda.qcow2"
    layout = plan(size, [], zero_ranges, backing="../b0/vda.qcow2")
    assert layout.runs == () and layout.data_bytes == 0
    write_image(layout, disk.path, inc)
    assert_check_clean(inc)
    assert same_as_raw(disk.path, inc)
    info = qemu_img("info", "--output=json", inc).stdout
    assert '"backing-filename-format": "qcow2"' in info


def test_a_sparse_image_beyond_2_gib_needs_several_refcount_blocks(tmp_path: Path) -> None:
    # 3 GiB of data clusters: more than one refcount block (each counts 2 GiB of file) and
    # several L2 tables. Only the metadata is written; the data clusters are a hole.
    size = 3 * GiB + 7 * 512
    layout = plan(size, [(0, size)])
    assert layout.refcount_blocks == 2
    img = tmp_path / "sparse.qcow2"
    with img.open("wb") as f:
        for chunk in layout.metadata():
            f.write(chunk)
        assert f.tell() == layout.data_start
        f.truncate(layout.size)
    assert_check_clean(img)
    assert qemu_img("map", "--output=json", img).returncode == 0


@settings(PROFILE, max_examples=25)
@given(
    target=st.sampled_from([32768, 65536, 98304]),
    delta=st.integers(-40, 40),
    zeros=st.integers(0, 20_000),
)
def test_refcount_blocks_count_themselves(target: int, delta: int, zeros: int) -> None:
    # Data cluster counts around the points where the file crosses 2, 4, 6 GiB; zero clusters
    # add L2 tables but no data.
    n = target + delta
    size = (n + zeros) * CLUSTER + 512
    layout = plan(size, [(0, n * CLUSTER)], [(n * CLUSTER, size)])
    clusters = layout.size // CLUSTER
    assert (layout.refcount_blocks - 1) * 32768 < clusters <= layout.refcount_blocks * 32768
    assert parse(layout, b"".join(layout.metadata())) == expected_mapping(layout)


def test_the_refcount_table_grows_past_one_cluster() -> None:
    # 8192 refcount blocks (16 TiB of file) fill one refcount table cluster.
    layout = plan(20 * TiB, [(0, 20 * TiB)])
    clusters = layout.size // CLUSTER
    assert layout.refcount_table_clusters == 2
    assert (layout.refcount_blocks - 1) * 32768 < clusters <= layout.refcount_blocks * 32768
    meta = layout.metadata()
    header, l1 = next(meta), next(meta)
    assert struct.unpack_from(">I", header, 56) == (2,)
    table = next(meta) + next(meta)
    blocks = struct.unpack(">16384Q", table)
    first = layout.refcount_table_offset + 2 * CLUSTER
    assert blocks[: layout.refcount_blocks] == tuple(
        range(first, first + layout.refcount_blocks * CLUSTER, CLUSTER)
    )
    assert not any(blocks[layout.refcount_blocks :])
    assert len(l1) == 40 * 1024 * 8


def test_an_empty_disk(tmp_path: Path) -> None:
    layout = plan(0, [(0, CLUSTER)], [(0, CLUSTER)])
    assert (layout.runs, layout.zeros, layout.l1_clusters) == ((), (), 0)
    img = tmp_path / "empty.qcow2"
    (tmp_path / "empty.raw").touch()
    write_image(layout, tmp_path / "empty.raw", img)
    assert_check_clean(img)
    assert parse(layout, img.read_bytes()) == {}


def test_plan_rejects_what_qcow2_cannot_hold() -> None:
    with pytest.raises(ValueError, match="multiple of 512"):
        plan(1000, [])
    with pytest.raises(ValueError, match="backing file name"):
        plan(CLUSTER, [], backing="x" * 1024)


# --- emit ----------------------------------------------------------------------------------------


def _source(size: int) -> bytes:
    return random.Random(size).randbytes(size)


async def test_emit_keeps_order_with_reads_finishing_out_of_order() -> None:
    size = 40 * CLUSTER + 1536
    src = _source(size)
    layout = plan(size, [(0, 3 * CLUSTER), (10 * CLUSTER, size)])
    running, peak = 0, 0
    calls = 0

    async def read(offset: int, length: int) -> bytes:
        nonlocal running, peak, calls
        running += 1
        calls += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005 if calls % 4 == 1 else 0)  # every fourth read is slow
        running -= 1
        return src[offset : offset + length]

    out = b"".join([c async for c in emit(layout, read, piece=20_000, depth=4)])
    assert len(out) == layout.size
    assert peak == 4
    assert out[: layout.data_start] == b"".join(layout.metadata())
    expected = b"".join(src[o : o + n] for o, n in layout.runs)
    assert out[layout.data_start :] == expected + bytes(
        layout.size - layout.data_start - len(expected)
    )


async def test_emit_raises_on_a_short_read() -> None:
    size = 8 * CLUSTER
    layout = plan(size, [(0, size)])

    async def read(offset: int, length: int) -> bytes:
        return bytes(length - (offset >= 5 * CLUSTER))

    with pytest.raises(ShortRead, match="returned 65535 bytes"):
        async for _ in emit(layout, read, piece=CLUSTER):
            pass


async def test_cancelling_the_consumer_cancels_the_reads() -> None:
    layout = plan(64 * CLUSTER, [(0, 64 * CLUSTER)])
    started: list[int] = []
    cancelled: list[int] = []
    blocked = asyncio.Event()
    first = asyncio.Event()  # set: the read at offset 0 returns at once

    async def read(offset: int, length: int) -> bytes:
        started.append(offset)
        if len(started) == 3:
            blocked.set()
        if offset == 0 and first.is_set():
            return bytes(length)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(offset)
            raise
        return b""

    async def consume(stream: AsyncIterator[bytes]) -> None:
        async for _ in stream:
            pass

    task = asyncio.create_task(consume(emit(layout, read, piece=CLUSTER, depth=3)))
    await blocked.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(cancelled) == sorted(started) == [0, CLUSTER, 2 * CLUSTER]

    # A consumer that stops after the first piece of data and closes the stream.
    started.clear()
    cancelled.clear()
    first = asyncio.Event()
    first.set()

    stream = cast(AsyncGenerator[bytes, None], emit(layout, read, piece=CLUSTER, depth=3))
    got = 0
    async for chunk in stream:
        got += len(chunk)
        if got > layout.data_start:
            break
    await stream.aclose()
    assert got == layout.data_start + CLUSTER
    assert started == [0, CLUSTER, 2 * CLUSTER]
    assert sorted(cancelled) == [CLUSTER, 2 * CLUSTER]
