"""A pull-mode backup, streamed: each disk's NBD export read once, as a qcow2 file written
front to back into whatever the caller sends it to (a storage driver's ``put``).

For each exported disk the block status is read first (what holds data; for an incremental,
what changed since the parent checkpoint), so the whole image is laid out, and its size known,
before its first byte is read (``app.virt.qcow2``). Memory stays bounded whatever the disk's
size: a few reads in flight and one metadata table at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from app.virt.backup import Export, PullJob, abort_job, begin_pull, finish_pull
from app.virt.errors import DomainStopped, ScratchFull, VirtError
from app.virt.nbd import STATE_DIRTY, STATE_ZERO, NbdClient
from app.virt.qcow2 import CLUSTER, Layout, emit, plan

log = logging.getLogger(__name__)

ALLOCATION = "base:allocation"
READ_PIECE = 4 * 1024 * 1024  # bytes per NBD read
READS_IN_FLIGHT = 4
# Room kept free in the scratch folder. A block the guest overwrites while the job runs is
# first copied there; if that copy cannot be written, the guest's write fails (the VM pauses,
# by default): the job is stopped before the room runs out. Checked every WATCH_S, so the
# reserve must outlast what the guests can write meanwhile.
SCRATCH_RESERVE = 512 * 1024 * 1024
WATCH_S = 0.1

Progress = Callable[[int, int], None]  # (bytes sent, bytes planned)
Ranges = list[tuple[int, int]]  # (start, end), sorted, disjoint


@dataclass
class Disk:
    target: str
    layout: Layout
    client: NbdClient


@dataclass
class Pull:
    """The disks of a running pull job, each planned; ``stream`` them in turn."""

    disks: list[Disk]
    progress: Progress | None = None
    sent: int = 0
    planned: int = field(init=False)

    def __post_init__(self) -> None:
        self.planned = sum(d.layout.size for d in self.disks)

    async def stream(self, disk: Disk) -> AsyncIterator[bytes]:
        """The disk's qcow2 image, front to back: exactly ``disk.layout.size`` bytes."""
        async for chunk in emit(
            disk.layout, disk.client.read, piece=READ_PIECE, depth=READS_IN_FLIGHT
        ):
            self.sent += len(chunk)
            if self.progress is not None:
                self.progress(self.sent, self.planned)
            yield chunk


@contextlib.asynccontextmanager
async def pull_backup(
    uri: str,
    domain: str,
    targets: list[str],
    scratch_dir: Path,
    checkpoint: str,
    incremental_from: str | None,
    backing: Mapping[str, str],
    progress: Progress | None = None,
    reserve: int = SCRATCH_RESERVE,
) -> AsyncIterator[Pull]:
    """Run a pull-mode backup of ``targets`` for the body of the ``async with``.

    ``backing`` names, per disk, the parent's image an incremental's file points to (relative
    to where the file will be stored). Leaving the body normally ends the job and keeps
    ``checkpoint``; leaving it by an exception (a cancel included) ends the job and deletes
    the checkpoint, raising DomainStopped instead when the VM's QEMU process went away.

    While it runs, the job is stopped (ScratchFull) when less than ``reserve`` bytes are free
    in ``scratch_dir``; it does not start with less than twice that.
    """
    free = await asyncio.to_thread(_free_bytes, scratch_dir)
    if free < 2 * reserve:
        raise ScratchFull(
            f"The scratch folder {scratch_dir} has {free} bytes free; a backup starts with at"
            f" least {2 * reserve}",
            free,
            reserve,
        )
    job = await asyncio.to_thread(
        begin_pull, uri, domain, targets, scratch_dir, checkpoint, incremental_from
    )
    disks: list[Disk] = []
    watch = asyncio.create_task(_watch(uri, domain, scratch_dir, reserve))
    try:
        for export in job.exports:
            disks.append(await _open(job, export, backing.get(export.target)))
        yield Pull(disks, progress)
        tripped = _stop(watch)
        if tripped is not None:
            raise tripped
    except BaseException as exc:
        tripped = _stop(watch)
        await _close(disks)
        cancelled = isinstance(exc, asyncio.CancelledError)
        failure = tripped if tripped is not None and not cancelled else exc
        try:
            await asyncio.to_thread(finish_pull, uri, job, failure)
        except DomainStopped as stopped:
            raise stopped from exc
        if failure is not exc:
            raise failure from exc
        raise
    await _close(disks)
    await asyncio.to_thread(finish_pull, uri, job)


def _stop(watch: asyncio.Task[ScratchFull]) -> ScratchFull | None:
    """End the watch; what it found, if it stopped the job."""
    if not watch.done():
        watch.cancel()
        return None
    if watch.cancelled():
        return None
    if watch.exception() is not None:
        log.error("watching the scratch folder failed: %s", watch.exception())
        return None
    return watch.result()


async def _watch(uri: str, domain: str, scratch_dir: Path, reserve: int) -> ScratchFull:
    """Stop the job once less than ``reserve`` is free in the scratch folder; returns why."""
    while True:
        await asyncio.sleep(WATCH_S)
        free = await asyncio.to_thread(_free_bytes, scratch_dir)
        if free < reserve:
            await asyncio.to_thread(abort_job, uri, domain)
            return ScratchFull(
                f"The guest wrote more during the backup than the scratch folder {scratch_dir}"
                f" could hold ({free} bytes free, {reserve} kept in reserve): the backup was"
                " stopped before the guest's writes could fail",
                free,
                reserve,
            )


def _free_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


async def _open(job: PullJob, export: Export, backing: str | None) -> Disk:
    contexts = [ALLOCATION]
    if export.bitmap is not None:
        if backing is None:
            raise VirtError(f"An incremental backup of {export.target} needs its parent's file")
        contexts.append(f"qemu:dirty-bitmap:{export.bitmap}")
    client = await NbdClient.connect(str(job.socket), export.name, contexts)
    try:
        status = await client.block_status()
        size = client.size
        data = _clusters(
            ((e.offset, e.length) for e in status[ALLOCATION] if not e.flags & STATE_ZERO), size
        )
        if export.bitmap is None:
            return Disk(export.target, plan(size, _spans(data)), client)
        dirty = _clusters(
            ((e.offset, e.length) for e in status[contexts[1]] if e.flags & STATE_DIRTY), size
        )
        # A changed cluster that now reads as zero is stored as a zero cluster: left out, the
        # parent's old data would show through.
        changed = _intersect(dirty, data)
        zero = _subtract(dirty, changed)
        return Disk(export.target, plan(size, _spans(changed), _spans(zero), backing), client)
    except BaseException:
        await client.close()
        raise


async def _close(disks: list[Disk]) -> None:
    for disk in disks:
        with contextlib.suppress(Exception):
            await disk.client.close()


def _clusters(extents: Iterable[tuple[int, int]], size: int) -> Ranges:
    """The extents rounded out to whole clusters (the last one ends at ``size``), merged."""
    out: Ranges = []
    for offset, length in sorted(extents):
        if length <= 0:
            continue
        start = offset - offset % CLUSTER
        end = min(size, -(-(offset + length) // CLUSTER) * CLUSTER)
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _intersect(a: Ranges, b: Ranges) -> Ranges:
    out: Ranges = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _subtract(a: Ranges, b: Ranges) -> Ranges:
    out: Ranges = []
    j = 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > start:
                out.append((start, b[k][0]))
            start = max(start, b[k][1])
            k += 1
        if start < end:
            out.append((start, end))
    return out


def _spans(ranges: Ranges) -> list[tuple[int, int]]:
    return [(start, end - start) for start, end in ranges]
