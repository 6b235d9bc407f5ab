"""Starting the writeback of files while they are still being written (Linux sync_file_range).

A file written through the page cache reaches the disk only when the kernel gets round to it or
an fsync forces it, and the fsync then waits for all of it at once. Started early, the disk
works while the writer still does, and the final fsync has little left to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

_SYNC_FILE_RANGE_WRITE = 2
# While another process writes a file, its writeback is started this often.
PERIOD = 0.1


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux: the final fsync does all the work
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    sync_file_range: Callable[[int, int, int, int], int] = fn
    return sync_file_range


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk, without waiting (best effort).

    ``length`` 0 means up to the end of the file.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


@contextmanager
def written_back(paths: Sequence[Path]) -> Iterator[None]:
    """While the block runs, keep starting the writeback of ``paths``, which another process
    (QEMU, qemu-img) is writing; a path is picked up once it exists. Durability still needs
    an fsync at the end: this only makes it quick."""
    stop = threading.Event()
    pump = threading.Thread(target=_pump, args=(list(paths), stop), name="ibp-writeback")
    pump.start()
    try:
        yield
    finally:
        stop.set()
        pump.join()


def _pump(paths: list[Path], stop: threading.Event) -> None:
    fds: dict[Path, int] = {}
    try:
        while not stop.wait(PERIOD):
            for path in paths:
                if path not in fds:
                    try:
                        fds[path] = os.open(path, os.O_RDONLY)
                    except FileNotFoundError:  # not created yet
                        continue
                start_writeback(fds[path], 0, 0)
    finally:
        for fd in fds.values():
            os.close(fd)
