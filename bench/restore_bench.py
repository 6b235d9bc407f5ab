"""Benchmark (run by hand): restore through the restore code path vs. ``qemu-img convert``.

    .venv/bin/python bench/restore_bench.py [--size-mib 1024] [--rounds 3] [--dir /var/tmp]

Needs root and libvirtd (started by scripts/start-libvirtd.sh if not running). Builds a VM
``ibp-test-bench-...`` whose disk is ~90% random data, takes a full and 3 incrementals (each
after rewriting ~1% of the disk) with app.virt.pull_backup, streamed into the local driver
in the service's layout. Then ``rounds`` times, each side first in every other round:

- restore: a fresh process runs app.engine.chain_fetch.rebuild as the restore job does (fetch
  through the driver, sha256 of every file against the catalog, convert of the newest file with
  the image's writeback started as it is written, qemu-img check, fsync) into a new disk, and
  reports its own time and peak RSS;
- reference: ``qemu-img convert -O qcow2`` of the newest stored file by hand, then an fsync of
  the image, since the restore job only puts an image in place once it is on disk.

Each side starts its timed part with memory the host has already backed (bench/_disk.py).

Prints the medians, the ratio restore/reference (target <= 1.3) and the restoring process's peak
RSS (target <= 200 MB); for comparison, the reference's convert alone (its image still in the
page cache) and the time to sha256 the chain alone, which no restore can go below. The VM and
every file are always removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.storage.files import fsync_path  # noqa: E402
from app.storage.pipeline import sha256_of  # noqa: E402
from bench._disk import prime_free_space, prime_memory  # noqa: E402

MiB = 1024 * 1024


def make_raw(path: Path, size: int, random_share: float = 0.9) -> None:
    chunk = 16 * MiB
    random_bytes = int(size * random_share) // chunk * chunk
    with path.open("wb") as fh:
        for _ in range(random_bytes // chunk):
            fh.write(os.urandom(chunk))
        fh.truncate(size)


async def _store_chain(name: str, uri: str, size: int, storage: Path, scratch: Path) -> dict:
    """Full + 3 incrementals of the VM's vda, stored with the local driver; the catalog."""
    from app.storage.registry import get_driver
    from app.virt import pull_backup
    from tests.virt import vmkit

    driver = get_driver("local", {"path": str(storage)})
    instance, chain = uuid.uuid4(), uuid.uuid4()
    members: list[dict] = []
    parent: str | None = None
    try:
        for i in range(4):
            if i:
                # ~1% of the disk in 64 KiB pieces spread over it, different each time.
                piece = 64 * 1024
                pieces = max(1, size // 100 // piece)
                stride = size // pieces // piece * piece
                for k in range(pieces):
                    vmkit.write_pattern(name, "vda", 0xA0 + i, k * stride + i * piece, piece)
            backup = uuid.uuid4()
            cp = f"bench-{backup}"
            prev = members[-1]["checkpoint"] if members else None
            backing = {"vda": f"../{parent}/vda.qcow2"} if parent else {}
            key = f"{instance}/{chain}/{backup}/vda.qcow2"
            # Streamed into the local driver, as the backup job stores it.
            async with pull_backup(uri, name, ["vda"], scratch, cp, prev, backing) as pull:
                (disk,) = pull.disks
                put = await driver.put(key, pull.stream(disk), disk.layout.size)
            members.append(
                {
                    "id": str(backup),
                    "type": "incremental" if parent else "full",
                    "parent_id": parent,
                    "checkpoint": cp,
                    "key": key,
                    "size": put.size,
                    "sha256": put.sha256,
                }
            )
            parent = str(backup)
    finally:
        await driver.close()
    return {"storage": str(storage), "members": members}


def _written_at_most(catalog: dict) -> int:
    """What a restore of the chain writes, with room to spare: the memory to prime for it."""
    return sum(int(m["size"]) for m in catalog["members"]) * 5 // 4


async def _restore_once(catalog: dict, work: Path, out: Path) -> tuple[float, float]:
    from app.engine.chain_fetch import ChainPlan, Member, rebuild
    from app.models import BackupFile
    from app.storage.registry import get_driver

    members = [
        Member(
            uuid.UUID(m["id"]),
            m["type"],
            datetime.now(UTC),
            uuid.UUID(m["parent_id"]) if m["parent_id"] else None,
            {
                "vda": BackupFile(
                    disk_target="vda",
                    object_key=m["key"],
                    size_bytes=m["size"],
                    sha256=m["sha256"],
                )
            },
        )
        for m in catalog["members"]
    ]
    plan = ChainPlan(members[-1].id, uuid.uuid4(), members, ["vda"])
    driver = get_driver("local", {"path": catalog["storage"]})
    prime_memory(out.parent, _written_at_most(catalog))
    t0 = time.perf_counter()
    try:
        await rebuild(driver, plan, work, {"vda": out}, durable=True)  # as the restore job
    finally:
        await driver.close()
        shutil.rmtree(work, ignore_errors=True)  # the restore job removes its work dir too
    rebuilt = time.perf_counter() - t0
    fsync_path(out)  # already on disk (durable=True): this only proves it
    return rebuilt, time.perf_counter() - t0


def child(catalog_path: Path, work: Path, out: Path) -> int:
    catalog = json.loads(catalog_path.read_text())
    seconds, durable = asyncio.run(_restore_once(catalog, work, out))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "durable": durable, "rss": rss, "children_rss": kids}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--child", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    from tests.virt import vmkit

    size = args.size_mib * MiB
    vmkit.ensure_libvirtd()
    work = Path(tempfile.mkdtemp(prefix="ibp-restore-bench-", dir=args.dir))
    name = vmkit.unique_name("bench")
    try:
        raw = work / "seed.raw"
        make_raw(raw, size)
        vm = vmkit.define_vm(name, [("vda", size)], work / "vm", fill_from={"vda": raw})
        raw.unlink()
        scratch, storage = work / "scratch", work / "storage"
        scratch.mkdir()
        storage.mkdir()
        t0 = time.perf_counter()
        catalog = asyncio.run(_store_chain(name, vm.uri, size, storage, scratch))
        sizes = ", ".join(f"{m['type']} {m['size'] / MiB:.1f} MiB" for m in catalog["members"])
        print(f"chain stored in {time.perf_counter() - t0:.1f}s: {sizes}")
        vmkit.destroy_vm(name)  # the restore reads storage only
        prime_free_space(work, (2 * args.rounds + 1) * size)
        catalog_path = work / "catalog.json"
        catalog_path.write_text(json.dumps(catalog))
        newest = storage / catalog["members"][-1]["key"]

        convert_times, rss, kids = [], [], []
        durable_restore, durable_convert = [], []
        hash_times: list[float] = []
        for i in range(args.rounds):
            out = work / f"restored-{i}.qcow2"
            ref = work / f"reference-{i}.qcow2"

            def restore(out: Path = out) -> None:
                child = [sys.executable, __file__, "--child", str(catalog_path), str(work / "w")]
                os.sync()
                proc = subprocess.run(
                    [*child, str(out)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                durable_restore.append(result["durable"])
                rss.append(result["rss"])
                kids.append(result["children_rss"])

            def reference(ref: Path = ref) -> None:
                os.sync()
                prime_memory(work, _written_at_most(catalog))
                t0 = time.perf_counter()
                subprocess.run(
                    ["qemu-img", "convert", "-O", "qcow2", str(newest), str(ref)], check=True
                )
                convert_times.append(time.perf_counter() - t0)
                fsync_path(ref)
                durable_convert.append(time.perf_counter() - t0)

            # Each side goes first every other round: what one leaves behind (writeback,
            # discards of deleted files, page cache to refill) lands on both alike.
            for side in (restore, reference) if i % 2 == 0 else (reference, restore):
                side()
            t0 = time.perf_counter()
            for m in catalog["members"]:
                sha256_of(storage / m["key"])
            hash_times.append(time.perf_counter() - t0)
            same = subprocess.run(["qemu-img", "compare", str(out), str(ref)], check=False)
            assert same.returncode == 0, "restored image differs from the reference"
            print(
                f"round {i + 1}: restore {durable_restore[-1]:.2f}s (peak RSS "
                f"{rss[-1] / MiB:.0f} MiB, qemu-img {kids[-1] / MiB:.0f} MiB)   qemu-img convert "
                f"{convert_times[-1]:.2f}s + fsync = {durable_convert[-1]:.2f}s   sha256 of the "
                f"chain alone {hash_times[-1]:.2f}s"
            )
            out.unlink()
            ref.unlink()
        mr, mc = statistics.median(durable_restore), statistics.median(durable_convert)
        print(
            f"restore median {mr:.2f}s | qemu-img convert + fsync median {mc:.2f}s | "
            f"ratio {mr / mc:.2f} (target <= 1.3) | peak RSS of the restoring process "
            f"{max(rss) / MiB:.0f} MiB (target <= 200), qemu-img children {max(kids) / MiB:.0f} MiB"
        )
        mh, ma = statistics.median(hash_times), statistics.median(convert_times)
        print(
            f"for comparison: the convert alone (image still in the page cache) median "
            f"{ma:.2f}s, restore / that {mr / ma:.2f}; sha256 of the chain alone (the restore "
            f"must check it) median {mh:.2f}s = {mh / mc:.2f}x the reference"
        )
    finally:
        vmkit.destroy_vm(name)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
