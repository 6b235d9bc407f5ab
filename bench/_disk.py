"""Shared by the benchmarks: make writes cost the same for both sides of a comparison.

Two things on these machines make the same write cost more on one side than on the other,
by luck of what ran before it; each helper below takes one of them away.

- Disk: the virtual disk is thin-provisioned by the host, and the first write to a block that
  was never written can cost about 2x a rewrite (1 GiB with O_DIRECT: 1.4 s, then 0.65 s).
  ``prime_free_space`` leaves enough already-written free blocks for every timed run.
- Memory: free memory is handed back to the host, and page cache written into such memory
  costs up to 10x more (``prime_memory``). An earlier version of this note put an 8x swing
  of `qemu-img convert` (2.5 s against 0.3 s per GiB) on the disk; perf shows such time
  spent in the kernel copying into the page cache, so it was most likely this.
"""

from __future__ import annotations

import os
from pathlib import Path

_BLOCK = 16 * 1024 * 1024
_SMALL_BLOCK = 1024 * 1024


def make_raw(path: Path, size: int, random_share: float = 0.9) -> None:
    """A raw disk image: random data in the first ``random_share`` of it, zeros after."""
    random_bytes = int(size * random_share) // _BLOCK * _BLOCK
    with path.open("wb") as fh:
        for _ in range(random_bytes // _BLOCK):
            fh.write(os.urandom(_BLOCK))
        fh.truncate(size)


def prime_free_space(directory: Path, size: int) -> None:
    """Write ``size`` bytes into ``directory``, fsync, delete: later writes reuse the blocks."""
    _ballast(directory / ".ballast", size, bytes(_BLOCK), durable=True)
    os.sync()


def prime_memory(directory: Path, size: int) -> None:
    """Write ``size`` bytes of page cache in ``directory`` and delete them unwritten: the
    memory a timed copy writes into next is then, mostly, memory the host has already backed.

    These machines are VMs whose free memory is handed back to the host (virtio-balloon free
    page reporting). Writing into the page cache costs 2.7 s per GiB of such handed-back
    memory against 0.25 s per GiB of memory freed just before (measured: the time is the
    kernel copying into pages the host must fault in), so whichever side of a comparison
    writes first after a pause would pay it. This lowers the odds, it does not remove them:
    the kernel here reports freed memory with no minimum wait (/sys/module/page_reporting/
    parameters: min_free_ms 0, max_waiting_mib 1024), so some rounds still pay; benches
    report medians over alternating rounds. Call this right before each timed side, with at
    least what it will write; no disk I/O is done.
    """
    # A small block: a process that measures its own peak RSS may call this.
    _ballast(directory / ".memory-ballast", size, b"\1" * _SMALL_BLOCK, durable=False)


def _ballast(path: Path, size: int, block: bytes, *, durable: bool) -> None:
    """Write ``size`` bytes (rounded up to whole ``block``s) to ``path``, fsync them if
    ``durable``, and delete the file."""
    try:
        with path.open("wb", buffering=0) as f:
            for _ in range(-(-size // len(block))):
                f.write(block)
            if durable:
                os.fsync(f.fileno())
    finally:
        path.unlink(missing_ok=True)
