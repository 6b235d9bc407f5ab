"""Local file I/O at the speed of the disk: a stream written past the page cache, and files
hashed while they are read.

A backup file is not read again soon, so caching it would only evict what the hypervisor's
guests use, and filling 1 GiB of page cache costs from 0.3 s to 2.5 s on these VMs depending on
how recently that memory was handed back to the host, where a direct write (O_DIRECT) costs the
same every time. Filesystems that refuse O_DIRECT get buffered writes, with writeback started
as each stretch is written so the final fsync has little left to do.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from io import RawIOBase

from app.storage.base import Sha256Counter
from app.writeback import start_writeback

WRITEBACK_EVERY = 64 * 1024 * 1024  # start writeback of each 64 MiB once it is written

_ALIGN = 4096  # O_DIRECT block alignment that every Linux filesystem accepts


class StreamWriter:
    """Writes chunks in order to a new file (one call at a time): directly while it can, else
    through the cache.

    O_DIRECT wants the memory, the file offset and the length block-aligned: each chunk is
    copied into a page-aligned buffer (a memcpy, far cheaper than the write) and its aligned
    part written directly. A tail that is not a whole block (only ever at the end of a stream
    of aligned chunks) turns direct writes off for the rest of the file.
    """

    def __init__(self, fd: int, direct: bool) -> None:
        self.fd = fd
        self.written = 0
        self.flushed = 0
        self.direct = direct and _set_direct(fd, True)
        self._buffer: mmap.mmap | None = None

    def write(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk)
        if self.direct:
            size = len(view) - len(view) % _ALIGN
            if size:
                done = self._write_direct(self._aligned(view[:size]))
                view = view[done:]
            if view:
                self._stop_direct()
        self._write_all(view)
        if not self.direct and self.written - self.flushed >= WRITEBACK_EVERY:
            start_writeback(self.fd, self.flushed, self.written - self.flushed)
            self.flushed = self.written

    def _aligned(self, view: memoryview) -> memoryview:
        if self._buffer is None or len(self._buffer) < len(view):
            # Anonymous maps are page-aligned, as O_DIRECT needs.
            self._buffer = mmap.mmap(-1, len(view))
        self._buffer[: len(view)] = view
        return memoryview(self._buffer)[: len(view)]

    def _write_direct(self, view: memoryview) -> int:
        """Write what the filesystem takes directly; stops (and says how far it got) at the
        first write it refuses with EINVAL, so the rest goes through the cache, never twice."""
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fd, view[done:])
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        self.written += done
        return done

    def _write_all(self, view: memoryview) -> None:
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.written += n

    def _stop_direct(self) -> None:
        self.direct = False
        _set_direct(self.fd, False)


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for an open file; False when the filesystem refuses it."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | direct if on else flags & ~direct)
    except OSError:
        return False
    return on


def _through_ring(
    src: RawIOBase,
    ring: Sequence[mmap.mmap | bytearray],
    submit: Callable[[memoryview], tuple[Future[None], ...]],
) -> None:
    """Read ``src`` to its end into the buffers of ``ring`` in turn, handing each filled one to
    ``submit``, which starts work on it in other threads. A buffer is read into again only once
    all the work started on it is done. Raises the first error of a read or of that work."""
    in_flight: deque[tuple[Future[None], ...]] = deque()
    try:
        turn = 0
        while True:
            if len(in_flight) == len(ring):  # the oldest buffer must be free before reuse
                _finish(in_flight.popleft())
            buf = ring[turn % len(ring)]
            n = src.readinto(buf)
            if not n:
                break
            in_flight.append(submit(memoryview(buf)[:n]))
            turn += 1
        while in_flight:
            _finish(in_flight.popleft())
    except BaseException:
        for futures in in_flight:
            for fut in futures:
                fut.cancel()
        raise


def _finish(futures: tuple[Future[None], ...]) -> None:
    for fut in futures:
        fut.result()


HASH_READ = 1024 * 1024
HASH_DEPTH = 3


def hash_file_into(f: RawIOBase, counter: Sha256Counter) -> None:
    """Hash a whole file: this thread reads into a small ring of reused buffers while another
    thread hashes each one, so reading and hashing overlap (here 15-20% faster than one after
    the other).

    ``read()`` would allocate a fresh chunk each time; on these VMs fresh memory can cost as
    much as the hash itself. (Hashing from an mmap of the file was slower still, and counts
    the whole file in the process's RSS.)
    """
    ring = [bytearray(HASH_READ) for _ in range(HASH_DEPTH)]
    with ThreadPoolExecutor(1, "ibp-hash") as hasher:
        _through_ring(f, ring, lambda view: (hasher.submit(counter.update, view),))


def sha256_of(path: str | os.PathLike[str]) -> str:
    counter = Sha256Counter()
    with open(path, "rb", buffering=0) as f:
        hash_file_into(f, counter)
    return counter.result().sha256
