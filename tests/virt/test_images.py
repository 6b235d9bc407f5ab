"""qemu-img helpers without any VM."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from app.virt import VirtError, check_image, image_info
from tests.virt.images import compare_images, data_bytes, rebuild_chain

MiB = 1024 * 1024


def _img(path: Path, size: int = 8 * MiB, backing: Path | None = None) -> Path:
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        cmd += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*cmd, str(path), str(size)], check=True)
    return path


def _write(path: Path, byte: int, offset: int, length: int) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {byte} {offset} {length}", str(path)],
        check=True,
        capture_output=True,
    )


def test_rebuild_chain_flattens_full_and_incrementals(tmp_path: Path) -> None:
    full = _img(tmp_path / "full.qcow2")
    _write(full, 0x11, 0, 2 * MiB)
    inc1 = _img(tmp_path / "inc1.qcow2", backing=full)
    _write(inc1, 0x22, 1 * MiB, 1 * MiB)
    inc2 = _img(tmp_path / "inc2.qcow2", backing=inc1)
    _write(inc2, 0x33, 6 * MiB, 64 * 1024)
    expected = tmp_path / "expected.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(inc2), str(expected)], check=True)
    # As stored: each incremental points at some name that does not exist here.
    for image, name in [(inc1, "../elsewhere/vda.qcow2"), (inc2, "../other/vda.qcow2")]:
        subprocess.run(
            ["qemu-img", "rebase", "-u", "-b", name, "-F", "qcow2", str(image)], check=True
        )
    assert image_info(inc2)["backing-filename"] == "../other/vda.qcow2"
    assert data_bytes(inc2) == 64 * 1024

    out = tmp_path / "out" / "restored.qcow2"
    rebuild_chain([full, inc1, inc2], out)
    info = image_info(out)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert compare_images(out, expected)
    check_image(out)
    assert [p.name for p in out.parent.iterdir()] == ["restored.qcow2"]

    single = tmp_path / "single.raw"
    rebuild_chain([full], single, out_format="raw")
    assert image_info(single)["format"] == "raw"
    assert not compare_images(single, expected)


def test_errors_are_explained(tmp_path: Path) -> None:
    with pytest.raises(VirtError, match="missing"):
        rebuild_chain([tmp_path / "nope.qcow2"], tmp_path / "out.qcow2")
    with pytest.raises(VirtError, match="at least the full"):
        rebuild_chain([], tmp_path / "out.qcow2")
    with pytest.raises(VirtError, match="qemu-img info failed"):
        image_info(tmp_path / "nope.qcow2")

    bad = _img(tmp_path / "bad.qcow2")
    _write(bad, 0x44, 0, 1 * MiB)
    with bad.open("r+b") as fh:  # trash the L1 table pointer's target: refcounts now wrong
        info = image_info(bad)
        assert info["format"] == "qcow2"
        fh.seek(0x30000)
        fh.write(b"\xff" * 4096)
    with pytest.raises(VirtError, match="qemu-img check failed"):
        check_image(bad)
    assert not (tmp_path / ".out.qcow2.partial").exists()
