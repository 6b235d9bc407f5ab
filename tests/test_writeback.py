"""The writeback pump's life cycle: it picks files up as they appear and leaves nothing open."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from app import writeback


def _pumps() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ibp-writeback"]


def test_files_are_picked_up_as_they_appear_and_closed_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[int] = []
    monkeypatch.setattr(writeback, "PERIOD", 0.01)
    monkeypatch.setattr(writeback, "start_writeback", lambda fd, off, n: started.append(fd))
    later, never = tmp_path / "later", tmp_path / "never"
    open_before = set(os.listdir("/proc/self/fd"))
    with writeback.written_back([later, never]):
        time.sleep(0.05)
        assert not started  # neither exists yet
        later.write_bytes(b"x" * 4096)
        deadline = time.monotonic() + 5
        while not started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert started
        fd = started[-1]
        assert os.readlink(f"/proc/self/fd/{fd}") == str(later)
    assert not _pumps()
    assert set(os.listdir("/proc/self/fd")) == open_before


def test_an_error_in_the_block_stops_the_pump_and_passes_through(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="convert failed"),
        writeback.written_back([tmp_path / "out"]),
    ):
        raise RuntimeError("convert failed")
    assert not _pumps()
