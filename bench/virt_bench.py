"""Benchmark (run by hand): libvirt push backup vs. a plain ``qemu-img convert`` copy.

    .venv/bin/python bench/virt_bench.py [--size-mib 1024] [--rounds 3] [--dir /var/tmp]

Needs root and libvirtd (started by scripts/start-libvirtd.sh if not running). Creates a VM
``ibp-test-bench-...`` whose 1 GiB disk is ~90% random data, then alternately times
``run_backup`` (full) and ``qemu-img convert -U -O qcow2`` of the same disk into the same folder,
and measures an incremental after rewriting 1% of the disk. The VM is always removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.virt import delete_checkpoint, run_backup  # noqa: E402
from bench._disk import make_raw, prime_free_space  # noqa: E402
from tests.virt import vmkit  # noqa: E402
from tests.virt.images import data_bytes  # noqa: E402

MiB = 1024 * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args()
    size = args.size_mib * MiB

    vmkit.ensure_libvirtd()
    work = Path(tempfile.mkdtemp(prefix="ibp-virt-bench-", dir=args.dir))
    scratch = work / "scratch"
    scratch.mkdir()
    name = vmkit.unique_name("bench")
    try:
        raw = work / "seed.raw"
        t0 = time.perf_counter()
        make_raw(raw, size)
        t = time.perf_counter() - t0
        print(f"seed: {args.size_mib} MiB raw, 90% random, in {t:.1f}s")
        vm = vmkit.define_vm(name, [("vda", size)], work / "vm", fill_from={"vda": raw})
        raw.unlink()
        disk = vm.disk("vda")
        prime_free_space(work, (2 * args.rounds + 2) * size)
        print(f"disk: {disk} ({disk.stat().st_size / MiB:.0f} MiB on disk)")

        backup_times: list[float] = []
        convert_times: list[float] = []
        for i in range(args.rounds):
            cp = f"bench-full-{i}"
            os.sync()  # start each timed copy with no dirty pages from the previous one
            t0 = time.perf_counter()
            run_backup(vm.uri, name, ["vda"], scratch, cp, None)
            tb = time.perf_counter() - t0
            backup_times.append(tb)
            out_b = scratch / f"{cp}-vda.qcow2"
            size_b = out_b.stat().st_size
            out_b.unlink()
            delete_checkpoint(vm.uri, name, cp)

            out_c = scratch / f"convert-{i}.qcow2"
            os.sync()
            t0 = time.perf_counter()
            subprocess.run(
                ["qemu-img", "convert", "-U", "-O", "qcow2", str(disk), str(out_c)], check=True
            )
            tc = time.perf_counter() - t0
            convert_times.append(tc)
            size_c = out_c.stat().st_size
            out_c.unlink()
            print(
                f"round {i + 1}: run_backup {tb:.2f}s ({size_b / MiB:.0f} MiB)   "
                f"qemu-img convert {tc:.2f}s ({size_c / MiB:.0f} MiB)"
            )
        mb = statistics.median(backup_times)
        mc = statistics.median(convert_times)
        print(
            f"full backup median {mb:.2f}s ({args.size_mib / mb:.0f} MiB/s) | "
            f"qemu-img convert median {mc:.2f}s ({args.size_mib / mc:.0f} MiB/s) | "
            f"ratio backup/convert {mb / mc:.2f}"
        )

        # Incremental after rewriting 1% of the disk in 64 KiB pieces spread over it.
        run_backup(vm.uri, name, ["vda"], scratch, "bench-base", None)[0].path.unlink()
        piece = 64 * 1024
        pieces = max(1, size // 100 // piece)
        stride = size // pieces // piece * piece  # granule-aligned: 64 KiB = 1 bitmap granule
        t0 = time.perf_counter()
        for k in range(pieces):
            vmkit.write_pattern(name, "vda", 0xA5, k * stride, piece)
        t = time.perf_counter() - t0
        written = pieces * piece
        print(f"wrote {pieces} x 64 KiB = {written / MiB:.2f} MiB (1%) in {t:.1f}s")
        t0 = time.perf_counter()
        run_backup(vm.uri, name, ["vda"], scratch, "bench-inc", "bench-base")
        ti = time.perf_counter() - t0
        inc_path = scratch / "bench-inc-vda.qcow2"
        data = data_bytes(inc_path)
        print(
            f"incremental: {ti:.2f}s, data {data / MiB:.2f} MiB, "
            f"file {inc_path.stat().st_size / MiB:.2f} MiB, data/written = {data / written:.3f}"
        )
    finally:
        vmkit.destroy_vm(name)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
