"""What the tests look at in images and domains, beside what the product does with them."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import libvirt

from app.virt import VirtError
from app.virt._conn import open_domain
from app.virt.images import LONG_TIMEOUT, run_qemu_img


def data_bytes(path: Path) -> int:
    """Bytes holding data in the top layer of a qcow2 ``path``; backing files are not opened."""
    spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}, "backing": None}
    proc = run_qemu_img(
        ["map", "--output=json", "-U", "json:" + json.dumps(spec)], timeout=LONG_TIMEOUT
    )
    total = 0
    for extent in json.loads(proc.stdout):
        if extent.get("data") and extent.get("depth", 0) == 0:
            total += int(extent["length"])
    return total


def compare_images(a: Path, b: Path) -> bool:
    """True when both images show the same guest-visible content (``qemu-img compare -U``)."""
    proc = run_qemu_img(["compare", "-U", str(a), str(b)], timeout=LONG_TIMEOUT, ok_codes=(0, 1))
    return proc.returncode == 0


def rebuild_chain(files: Sequence[Path], out: Path, out_format: str = "qcow2") -> None:
    """Turn local files [full, inc1, ..., incN] into one standalone image at ``out``.

    Each incremental is rebased in place (``-u``) onto the previous file, then the last one is
    converted (the whole chain flattened) to a temporary name beside ``out`` and renamed.
    """
    if not files:
        raise VirtError("rebuild_chain needs at least the full backup file")
    for f in files:
        if not f.is_file():
            raise VirtError(f"backup file {f} is missing")
    for prev, cur in itertools.pairwise(files):
        run_qemu_img(["rebase", "-u", "-b", str(prev.resolve()), "-F", "qcow2", str(cur)])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.unlink(missing_ok=True)
    try:
        run_qemu_img(["convert", "-O", out_format, str(files[-1]), str(tmp)], timeout=LONG_TIMEOUT)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def job_running(uri: str, domain: str) -> bool:
    """True while the domain has a job (a backup, usually) in progress."""
    with open_domain(uri, domain) as dom:
        return int(dom.jobStats().get("type", libvirt.VIR_DOMAIN_JOB_NONE)) != 0
