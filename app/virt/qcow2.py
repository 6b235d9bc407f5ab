"""A qcow2 writer for streams: the whole file planned from the extents, then written front to back.

Backups go from an NBD export straight to storage that can only append (S3 multipart, SFTP, FTP),
so nothing may be patched afterwards and the file size must be known before the first byte.
``plan`` lays the file out in this order, every cluster with refcount exactly 1::

    header (cluster 0: header, extensions, backing file name)
    L1 table
    refcount table
    refcount blocks (they count themselves: a small fixed point)
    L2 tables (only for L1 entries that map a data or zero cluster), in L1 order
    data clusters, in guest order

``Layout.metadata`` yields everything before the data, one table at a time; ``emit`` adds the
data read from the source. qcow2 version 3, 64 KiB clusters, 16-bit refcounts, no compression,
no encryption, no extended L2 entries. Spec: QEMU's docs/interop/qcow2.txt.
"""

from __future__ import annotations

import asyncio
import bisect
import struct
import sys
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field

from app.virt.errors import VirtError

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS  # 64 KiB
REFCOUNT_ORDER = 4  # 16-bit refcounts
_L2_ENTRIES = CLUSTER // 8  # 8192: one L2 table maps 512 MiB
_RB_ENTRIES = CLUSTER // 2  # 32768: one refcount block counts 2 GiB of file
_RT_ENTRIES = CLUSTER // 8  # 8192 refcount blocks per refcount table cluster
_HEADER_LENGTH = 104
_EXT_BACKING_FORMAT = 0xE2792ACA
_COPIED = 1 << 63  # refcount is exactly 1 (L1 and L2 entries)
_ZERO = 1  # L2 entry: the cluster reads as zeros (v3)
_MAX_BACKING_NAME = 1023
_MAX_L1_BYTES = 32 * 1024 * 1024  # QEMU's limit on the L1 table

Runs = tuple[tuple[int, int], ...]


class ShortRead(VirtError):
    """The source returned fewer (or more) bytes than asked for."""


@dataclass(frozen=True)
class Layout:
    """A planned qcow2 file. Offsets and sizes in bytes; ``runs`` and ``zeros`` are guest ranges."""

    virtual_size: int
    size: int  # bytes of the whole file (metadata + data)
    data_start: int  # file offset of the first data cluster (== bytes metadata() yields)
    runs: Runs  # guest ranges stored as data, ascending, cluster-aligned starts
    data_bytes: int  # sum of run lengths: what emit reads from the source
    zeros: Runs = ()  # guest ranges (cluster-aligned, clipped) marked "reads as zero"
    backing: str | None = None
    l1_clusters: int = 0
    refcount_table_clusters: int = 0
    refcount_blocks: int = 0
    l2_tables: tuple[int, ...] = field(default=(), repr=False)  # L1 indices that have a table

    @property
    def l1_size(self) -> int:
        return _l1_size(self.virtual_size)

    @property
    def clusters(self) -> int:
        return self.size // CLUSTER

    @property
    def l1_offset(self) -> int:
        return CLUSTER

    @property
    def refcount_table_offset(self) -> int:
        return self.l1_offset + self.l1_clusters * CLUSTER

    @property
    def refcount_blocks_offset(self) -> int:
        return self.refcount_table_offset + self.refcount_table_clusters * CLUSTER

    @property
    def l2_offset(self) -> int:
        return self.refcount_blocks_offset + self.refcount_blocks * CLUSTER

    def metadata(self) -> Iterator[bytes]:
        """The first ``data_start`` bytes of the file, one cluster or table at a time."""
        yield self._header()
        if self.l1_clusters:
            yield self._l1()
        yield from self._refcount_table()
        yield from self._refcount_blocks()
        yield from self._l2s()

    def _header(self) -> bytes:
        exts = b""
        name = b""
        if self.backing is not None:
            name = self.backing.encode()
            exts += _extension(_EXT_BACKING_FORMAT, b"qcow2")
        exts += _extension(0, b"")
        name_offset = _HEADER_LENGTH + len(exts) if name else 0
        head = struct.pack(
            ">4sIQIIQIIQQIIQQQQII",
            b"QFI\xfb",
            3,  # version
            name_offset,
            len(name),
            CLUSTER_BITS,
            self.virtual_size,
            0,  # crypt_method
            self.l1_size,
            self.l1_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            0,  # nb_snapshots
            0,  # snapshots_offset
            0,  # incompatible_features
            0,  # compatible_features
            0,  # autoclear_features
            REFCOUNT_ORDER,
            _HEADER_LENGTH,
        )
        cluster = head + exts + name
        return cluster + bytes(CLUSTER - len(cluster))

    def _l1(self) -> bytes:
        table = bytearray(self.l1_clusters * CLUSTER)
        for rank, index in enumerate(self.l2_tables):
            struct.pack_into(">Q", table, index * 8, (self.l2_offset + rank * CLUSTER) | _COPIED)
        return bytes(table)

    def _refcount_table(self) -> Iterator[bytes]:
        first = self.refcount_blocks_offset
        for start in range(0, self.refcount_table_clusters * _RT_ENTRIES, _RT_ENTRIES):
            count = max(0, min(_RT_ENTRIES, self.refcount_blocks - start))
            offsets = range(first + start * CLUSTER, first + (start + count) * CLUSTER, CLUSTER)
            yield _be64(offsets) + bytes((_RT_ENTRIES - count) * 8)

    def _refcount_blocks(self) -> Iterator[bytes]:
        for block in range(self.refcount_blocks):
            used = min(_RB_ENTRIES, self.clusters - block * _RB_ENTRIES)
            yield b"\x00\x01" * used + bytes((_RB_ENTRIES - used) * 2)

    def _l2s(self) -> Iterator[bytes]:
        # Data clusters in guest order: the host offset of guest cluster g inside run i is
        # data_start + (clusters stored by runs before i + g - first cluster of run i) * CLUSTER.
        starts = [off // CLUSTER for off, _ in self.runs]
        ends = [_ceil(off + length, CLUSTER) for off, length in self.runs]
        before = [0] * len(self.runs)
        for i in range(1, len(self.runs)):
            before[i] = before[i - 1] + ends[i - 1] - starts[i - 1]
        zstarts = [off // CLUSTER for off, _ in self.zeros]
        zends = [_ceil(off + length, CLUSTER) for off, length in self.zeros]
        for index in self.l2_tables:
            lo, hi = index * _L2_ENTRIES, (index + 1) * _L2_ENTRIES
            table = bytearray(CLUSTER)
            i = bisect.bisect_right(ends, lo)
            while i < len(starts) and starts[i] < hi:
                a, b = max(lo, starts[i]), min(hi, ends[i])
                host = self.data_start + (before[i] + a - starts[i]) * CLUSTER
                table[(a - lo) * 8 : (b - lo) * 8] = _be64(
                    range(host | _COPIED, (host + (b - a) * CLUSTER) | _COPIED, CLUSTER)
                )
                i += 1
            j = bisect.bisect_right(zends, lo)
            while j < len(zstarts) and zstarts[j] < hi:
                a, b = max(lo, zstarts[j]), min(hi, zends[j])
                table[(a - lo) * 8 : (b - lo) * 8] = _ZERO.to_bytes(8, "big") * (b - a)
                j += 1
            yield bytes(table)


def plan(
    virtual_size: int,
    data: Iterable[tuple[int, int]],
    zero: Iterable[tuple[int, int]] = (),
    backing: str | None = None,
) -> Layout:
    """Lay out a qcow2 file of a ``virtual_size``-byte disk.

    ``data``: guest ranges (offset, length), any alignment and order, overlaps allowed, that must
    be stored; rounded outward to clusters. ``zero``: ranges marked "reads as zero", rounded
    inward (a range reaching the end of the disk covers the last, partial cluster); data wins
    where both apply. Everything else is left unallocated: it reads from the backing file, or as
    zeros without one. ``backing``: the backing file name written in the header, with the
    backing format "qcow2".
    """
    if virtual_size < 0 or virtual_size % 512:
        raise ValueError(f"virtual size {virtual_size} is not a multiple of 512")
    if _l1_size(virtual_size) * 8 > _MAX_L1_BYTES:
        raise ValueError(f"virtual size {virtual_size} is too large for 64 KiB clusters")
    if backing is not None and not 0 < len(backing.encode()) <= _MAX_BACKING_NAME:
        raise ValueError(f"backing file name must be 1 to {_MAX_BACKING_NAME} bytes")
    disk_clusters = _ceil(virtual_size, CLUSTER)

    stored: list[tuple[int, int]] = []  # cluster ranges [a, b)
    for off, length in data:
        _check_range(off, length)
        a, b = off // CLUSTER, min(_ceil(off + length, CLUSTER), disk_clusters)
        if a < b:
            stored.append((a, b))
    stored = _merge(stored)

    zeroed: list[tuple[int, int]] = []
    for off, length in zero:
        _check_range(off, length)
        end = off + length
        a = _ceil(off, CLUSTER)
        b = disk_clusters if end >= virtual_size else end // CLUSTER
        if a < b:
            zeroed.append((a, b))
    zeroed = _subtract(_merge(zeroed), stored)

    l1_size = _l1_size(virtual_size)
    has_table = bytearray(l1_size)
    for a, b in (*stored, *zeroed):
        first, last = a // _L2_ENTRIES, (b - 1) // _L2_ENTRIES
        has_table[first : last + 1] = b"\x01" * (last + 1 - first)
    l2_tables = tuple(i for i, flag in enumerate(has_table) if flag)

    data_clusters = sum(b - a for a, b in stored)
    l1_clusters = _ceil(l1_size * 8, CLUSTER)  # none for an empty disk: QEMU would call it leaked
    fixed = 1 + l1_clusters + len(l2_tables) + data_clusters
    blocks, table_clusters = 0, 1
    while True:  # refcount blocks count themselves and the refcount table: iterate to a fixed point
        total = fixed + table_clusters + blocks
        new_blocks = _ceil(total, _RB_ENTRIES)
        new_table = max(1, _ceil(new_blocks, _RT_ENTRIES))
        if (new_blocks, new_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = new_blocks, new_table

    meta_clusters = 1 + l1_clusters + table_clusters + blocks + len(l2_tables)

    def _guest(a: int, b: int) -> tuple[int, int]:
        return a * CLUSTER, min(b * CLUSTER, virtual_size) - a * CLUSTER

    runs = tuple(_guest(a, b) for a, b in stored)
    return Layout(
        virtual_size=virtual_size,
        size=(meta_clusters + data_clusters) * CLUSTER,
        data_start=meta_clusters * CLUSTER,
        runs=runs,
        data_bytes=sum(length for _, length in runs),
        zeros=tuple(_guest(a, b) for a, b in zeroed),
        backing=backing,
        l1_clusters=l1_clusters,
        refcount_table_clusters=table_clusters,
        refcount_blocks=blocks,
        l2_tables=l2_tables,
    )


async def emit(
    layout: Layout,
    read: Callable[[int, int], Awaitable[bytes]],
    *,
    piece: int = 4 * 1024 * 1024,
    depth: int = 4,
) -> AsyncIterator[bytes]:
    """The whole file, front to back: ``layout.metadata()``, then each run read with
    ``read(offset, length)`` in pieces of at most ``piece`` bytes, up to ``depth`` reads in flight
    (output in order), the last partial cluster padded with zeros. Exactly ``layout.size`` bytes.

    A read returning another length than asked raises ShortRead. Closing or cancelling the
    consumer cancels the reads in flight.
    """
    if piece <= 0 or depth <= 0:
        raise ValueError("piece and depth must be positive")
    written = 0
    for chunk in layout.metadata():
        written += len(chunk)
        yield chunk
    assert written == layout.data_start, (written, layout.data_start)

    async def _read(offset: int, length: int) -> bytes:
        got = await read(offset, length)
        if len(got) != length:
            raise ShortRead(f"read of {length} bytes at offset {offset} returned {len(got)} bytes")
        return got

    pieces = (
        (off + at, min(piece, length - at))
        for off, length in layout.runs
        for at in range(0, length, piece)
    )
    inflight: list[asyncio.Task[bytes]] = []
    try:
        for offset, length in pieces:
            inflight.append(asyncio.ensure_future(_read(offset, length)))
            if len(inflight) >= depth:
                chunk = await inflight[0]
                inflight.pop(0)
                written += len(chunk)
                yield chunk
        while inflight:
            chunk = await inflight[0]
            inflight.pop(0)
            written += len(chunk)
            yield chunk
    finally:
        for task in inflight:
            task.cancel()
        if inflight:
            await asyncio.gather(*inflight, return_exceptions=True)
    pad = layout.size - written
    assert 0 <= pad < CLUSTER, (layout.size, written)
    if pad:
        written += pad
        yield bytes(pad)
    assert written == layout.size, (written, layout.size)


def _l1_size(virtual_size: int) -> int:
    return _ceil(_ceil(virtual_size, CLUSTER), _L2_ENTRIES)


def _ceil(n: int, unit: int) -> int:
    return -(-n // unit)


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"bad range ({offset}, {length})")


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _subtract(ranges: list[tuple[int, int]], minus: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ``ranges`` without the sorted, disjoint ``minus``."""
    out: list[tuple[int, int]] = []
    j = 0
    for a, b in ranges:
        while j < len(minus) and minus[j][1] <= a:
            j += 1
        k = j
        while a < b:
            if k >= len(minus) or minus[k][0] >= b:
                out.append((a, b))
                break
            if minus[k][0] > a:
                out.append((a, minus[k][0]))
            a = max(a, minus[k][1])
            k += 1
    return out


def _extension(kind: int, payload: bytes) -> bytes:
    padded = payload + bytes(-len(payload) % 8)
    return struct.pack(">II", kind, len(payload)) + padded


def _be64(values: range) -> bytes:
    words = array("Q", values)
    if sys.byteorder == "little":
        words.byteswap()
    return words.tobytes()
