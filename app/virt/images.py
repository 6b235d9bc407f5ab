"""qemu-img mechanics: info and check of stored images. No libvirt here."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.virt.errors import VirtError

QEMU_IMG = os.environ.get("IBP_QEMU_IMG", "qemu-img")
# Quick metadata operations vs. operations that copy a whole disk.
SHORT_TIMEOUT = 120.0
LONG_TIMEOUT = 6 * 3600.0


def run_qemu_img(
    args: Sequence[str], *, timeout: float = SHORT_TIMEOUT, ok_codes: Sequence[int] = (0,)
) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-img ARGS``; VirtError with its output unless the exit code is in ok_codes."""
    return _run(QEMU_IMG, "qemu-img " + args[0], args, timeout, ok_codes)


def _run(
    program: str, what: str, args: Sequence[str], timeout: float, ok_codes: Sequence[int] = (0,)
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            [program, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise VirtError(f"{program} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise VirtError(f"{what} timed out after {timeout:.0f}s") from exc
    if proc.returncode not in ok_codes:
        out = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        raise VirtError(f"{what} failed (exit {proc.returncode}): {' | '.join(out[-5:])}")
    return proc


def image_info(path: Path) -> dict[str, Any]:
    """``qemu-img info --output=json -U`` of one image (backing files not opened)."""
    proc = run_qemu_img(["info", "--output=json", "-U", str(path)])
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


def check_image(path: Path) -> None:
    """``qemu-img check``; VirtError with its output when the image is corrupt.

    Leaked clusters (exit 3) waste space but lose no data, so they pass.
    """
    run_qemu_img(["check", "-U", str(path)], timeout=LONG_TIMEOUT, ok_codes=(0, 3))
