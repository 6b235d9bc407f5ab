"""Shared by the benchmarks: make disk writes cost the same for both sides of a comparison.

The virtual disk of these machines is thin-provisioned by the host: the first write to a block
that was never written costs about 8x a rewrite (`qemu-img convert` of 1 GiB: 2.5 s into fresh
blocks, 0.3 s into reused ones). Which side of a comparison lands on fresh blocks is luck of
the filesystem's allocator, so timed runs would swing by seconds. Writing and deleting a
ballast file first leaves enough already-written free blocks for every timed run.
"""

from __future__ import annotations

import os
from pathlib import Path

_BLOCK = 16 * 1024 * 1024


def prime_free_space(directory: Path, size: int) -> None:
    """Write ``size`` bytes into ``directory``, fsync, delete: later writes reuse the blocks."""
    ballast = directory / ".ballast"
    zeros = bytes(_BLOCK)
    try:
        with ballast.open("wb") as f:
            for _ in range(-(-size // _BLOCK)):
                f.write(zeros)
            f.flush()
            os.fsync(f.fileno())
    finally:
        ballast.unlink(missing_ok=True)
        os.sync()
