"""Backup engine benchmark (run by hand): the whole backup job vs `qemu-img convert`.

    .venv/bin/python bench/backup_bench.py [--sizes 1,4] [--rounds 3] [--dir /var/tmp]

For each disk size (GiB): a VM whose disk is ~90% random data; in each round, each first in
every other round, (1) a full backup through the real job (`ibp run-backup` in a subprocess
whose modules are loaded before its timed part, as a running worker's are: libvirt push
backup, stream to local storage with sha256, manifest, catalog) and (2)
`qemu-img convert -U -O qcow2` of the same disk into the same folder. Prints the median times,
their ratio (target <= 1.3) and the job process's peak RSS (target <= 200 MB, and the same for
every size), and in each round the job's two big parts on their own (QEMU's push copy; the
sha256 of its output) and the least any backup that hashes what it stores must do (the disk's
file copied and hashed in one pass, without QEMU). Every timed copy starts with the source
warm (or cold, --cache) and with memory the host has backed (bench/_disk.py). Then an
incremental after rewriting 1% of the disk: bytes stored / bytes written (target <= 1.05).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402

from app.db import build_sessionmaker  # noqa: E402
from app.models import (  # noqa: E402
    Backup,
    BackupPolicy,
    BackupStorage,
    Hypervisor,
    Instance,
    InstanceDisk,
    Location,
    User,
)
from bench._disk import prime_free_space, prime_memory  # noqa: E402
from bench.virt_bench import make_raw  # noqa: E402
from tests.virt import vmkit  # noqa: E402

MiB = 1024 * 1024
PG = os.environ.get("IBP_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
DB = "ibp_bench_backup"
URL = f"{PG.replace('postgresql://', 'postgresql+asyncpg://')}/{DB}"


async def make_db() -> None:
    conn = await asyncpg.connect(f"{PG}/postgres")
    await conn.execute(f'DROP DATABASE IF EXISTS "{DB}"')
    await conn.execute(f'CREATE DATABASE "{DB}"')
    await conn.close()
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        check=True,
        cwd=REPO,
        env={**os.environ, "IBP_DATABASE_URL": URL},
        capture_output=True,
    )


async def seed(vm: vmkit.VM, storage_dir: Path, scratch: Path, size: int) -> uuid.UUID:
    engine = create_async_engine(URL)
    async with build_sessionmaker(engine)() as s:
        user = User(email=f"{uuid.uuid4().hex[:8]}@bench", password_hash="x")
        loc = Location(name=f"bench-{uuid.uuid4().hex[:6]}")
        storage = BackupStorage(
            name=f"bench-{uuid.uuid4().hex[:6]}", kind="local", config={"path": str(storage_dir)}
        )
        s.add_all([user, loc, storage])
        await s.flush()
        hv = Hypervisor(
            name=f"bench-{uuid.uuid4().hex[:6]}",
            location_id=loc.id,
            libvirt_uri=vm.uri,
            backup_storage_id=storage.id,
            scratch_dir=str(scratch),
        )
        policy = BackupPolicy(
            owner_id=user.id,
            name="bench",
            frequency="daily",
            hour=2,
            retention_count=100,
            max_incremental_chain=30,
            backup_device="primary",
        )
        s.add_all([hv, policy])
        await s.flush()
        instance = Instance(
            name="bench",
            owner_id=user.id,
            hypervisor_id=hv.id,
            domain_name=vm.name,
            backup_policy_id=policy.id,
            disks=[InstanceDisk(target="vda", boot=True, size_bytes=size)],
        )
        s.add(instance)
        await s.commit()
        instance_id = instance.id
    await engine.dispose()
    return instance_id


async def pending(instance_id: uuid.UUID, type_: str) -> uuid.UUID:
    engine = create_async_engine(URL)
    async with build_sessionmaker(engine)() as s:
        inst = await s.get(Instance, instance_id)
        assert inst is not None
        now = datetime.now(UTC)
        b = Backup(
            instance_id=instance_id,
            policy_id=inst.backup_policy_id,
            type=type_,
            status="pending",
            scheduled_for=now,
            created_at=now,
            backup_device="primary",
        )
        s.add(b)
        await s.commit()
        backup_id = b.id
    await engine.dispose()
    return backup_id


async def result(backup_id: uuid.UUID) -> Backup:
    engine = create_async_engine(URL)
    async with build_sessionmaker(engine)() as s:
        b = await s.get(Backup, backup_id)
    await engine.dispose()
    assert b is not None
    return b


# The job's process loads its modules first, as a running worker has them, and starts the
# backup when told: its timed part then follows the warming of the source disk at once, as the
# reference's does, instead of after seconds of imports.
CHILD = """
import sys
import app.cli
import worker.tasks.backup
print("ready", flush=True)
sys.stdin.readline()
sys.argv = ["ibp", "run-backup", sys.argv[1]]
app.cli.main()
"""


def run_job(backup_id: uuid.UUID, before: Callable[[], None]) -> tuple[float, float, int]:
    """Run the backup job in its own process, ``before()`` once it is loaded.

    Returns (seconds from go to exit, seconds to load, peak RSS bytes from VmHWM).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(backup_id)],
        cwd=REPO,
        env={**os.environ, "IBP_DATABASE_URL": URL},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    first = proc.stdout.readline()
    if first.strip() != "ready":
        raise SystemExit(f"backup job failed to start: {first}{proc.stdout.read()}")
    loaded = time.perf_counter() - t0
    before()
    t0 = time.perf_counter()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    peak = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    out = proc.stdout.read()
    if proc.returncode != 0 or not out.strip().startswith("completed"):
        raise SystemExit(f"backup job failed: {out}")
    return elapsed, loaded, peak


def prepare_cache(disk: Path, cache: str, out_dir: Path, size: int) -> None:
    """Start a timed copy with its source disk cold (not in the page cache) or warm (all in),
    and memory to write ``size`` bytes into that the host has already backed (``prime_memory``)."""
    os.sync()
    if cache == "cold":
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    else:
        with disk.open("rb", buffering=0) as f:
            while f.read(16 * MiB):
                pass
    prime_memory(out_dir, size + size // 4)


def job_parts(vm: vmkit.VM, scratch: Path, cache: str, size: int) -> tuple[float, float]:
    """Time the job's two big steps on their own: QEMU's push copy, then hashing its output.

    Neither can be left out of a backup (the catalog keeps every file's sha256), so each is a
    floor under the job's time. The checkpoint this copy creates is deleted again: libvirt
    merges its bitmap into the job's newest checkpoint, so the job's chain is unchanged.
    """
    from app.storage.pipeline import sha256_of
    from app.virt import delete_checkpoint, run_backup

    checkpoint = f"bench-parts-{uuid.uuid4().hex[:8]}"
    prepare_cache(vm.disk("vda"), cache, scratch, size)
    t0 = time.perf_counter()
    (copy,) = run_backup(vm.uri, vm.name, ["vda"], scratch, checkpoint, None)
    t1 = time.perf_counter()
    sha256_of(copy.path)
    t2 = time.perf_counter()
    copy.path.unlink()
    delete_checkpoint(vm.uri, vm.name, checkpoint)
    return t1 - t0, t2 - t1


def copy_floor(disk: Path, out_dir: Path, cache: str, size: int) -> float:
    """Time the least any backup that stores and hashes its bytes must do, without QEMU: copy
    the disk's file with the storage pipeline's copy-and-sha256 (read, write and hash each in
    its own thread), then fsync."""
    from app.storage.pipeline import copy_and_hash

    out = out_dir / "floor.qcow2"
    prepare_cache(disk, cache, out_dir, size)
    t0 = time.perf_counter()
    with disk.open("rb", buffering=0) as src, out.open("wb", buffering=0) as dst:
        copy_and_hash(src, dst.fileno())
        os.fsync(dst.fileno())
    elapsed = time.perf_counter() - t0
    out.unlink()
    return elapsed


def bench_size(gib: int, rounds: int, base: Path, cache: str) -> dict[str, float]:
    size = gib * 1024 * MiB
    work = Path(tempfile.mkdtemp(prefix="ibp-backup-bench-", dir=base))
    storage, scratch = work / "storage", work / "scratch"
    storage.mkdir()
    scratch.mkdir()
    name = vmkit.unique_name("bbench")
    try:
        raw = work / "seed.raw"
        make_raw(raw, size)
        vm = vmkit.define_vm(name, [("vda", size)], work / "vm", fill_from={"vda": raw})
        raw.unlink()
        instance_id = asyncio.run(seed(vm, storage, scratch, size))
        # Each round writes the backup (scratch, then moved), and the reference copy.
        prime_free_space(work, (2 * rounds + 2) * size)
        job_times, in_worker, convert_times, peaks = [], [], [], []
        push_times: list[float] = []
        hash_times: list[float] = []
        floor_times: list[float] = []
        times: dict[str, float] = {}  # this round's
        for i in range(rounds):
            out = storage / f"convert-{i}.qcow2"

            def job() -> None:
                backup_id = asyncio.run(pending(instance_id, "full"))
                elapsed, loaded, peak = run_job(
                    backup_id, lambda: prepare_cache(vm.disk("vda"), cache, scratch, size)
                )
                job_times.append(elapsed)
                done = asyncio.run(result(backup_id))
                assert done.started_at and done.completed_at
                in_worker.append((done.completed_at - done.started_at).total_seconds())
                peaks.append(peak)
                times["job"], times["load"] = elapsed, loaded

            def reference(out: Path = out) -> None:
                prepare_cache(vm.disk("vda"), cache, storage, size)
                t0 = time.perf_counter()
                subprocess.run(
                    ["qemu-img", "convert", "-U", "-O", "qcow2", str(vm.disk("vda")), str(out)],
                    check=True,
                )
                t1 = time.perf_counter()
                os.sync()  # the job fsyncs what it stores; make the reference pay the same
                t2 = time.perf_counter()
                convert_times.append(t2 - t0)
                times.update(convert=t1 - t0, sync=t2 - t1)

            # Each side goes first every other round: what one leaves behind (writeback,
            # page cache to refill) lands on both alike.
            for side in (job, reference) if i % 2 == 0 else (reference, job):
                side()
            print(
                f"  round {i + 1}: job {times['job']:.2f}s (in-worker {in_worker[-1]:.2f}s; "
                f"its process loaded in {times['load']:.2f}s before), "
                f"reference {times['convert'] + times['sync']:.2f}s = convert "
                f"{times['convert']:.2f}s + sync {times['sync']:.2f}s",
                flush=True,
            )
            out.unlink()
            push, digest = job_parts(vm, scratch, cache, size)
            push_times.append(push)
            hash_times.append(digest)
            floor_times.append(copy_floor(vm.disk("vda"), storage, cache, size))
            print(
                f"           the job's two big parts alone: libvirt push copy {push:.2f}s, "
                f"sha256 of the copy {digest:.2f}s; copy+sha256 of the disk file, no QEMU, "
                f"{floor_times[-1]:.2f}s",
                flush=True,
            )
        written = size // 100
        vmkit.write_pattern(vm.name, "vda", 0xA5, size // 3, written)
        inc_id = asyncio.run(pending(instance_id, "incremental"))
        run_job(inc_id, lambda: None)
        inc = asyncio.run(result(inc_id))
        assert inc.type == "incremental" and inc.size_bytes is not None
        return {
            "job": statistics.median(job_times),
            "in_worker": statistics.median(in_worker),
            "convert": statistics.median(convert_times),
            "best_in_worker": min(in_worker),
            "best_convert": min(convert_times),
            "peak_rss": max(peaks),
            "push": statistics.median(push_times),
            "hash": statistics.median(hash_times),
            "floor": statistics.median(floor_times),
            "inc_ratio": inc.size_bytes / written,
        }
    finally:
        vmkit.destroy_vm(name)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,4", help="disk sizes in GiB, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    ap.add_argument(
        "--cache",
        choices=["warm", "cold"],
        default="warm",
        help="source disk in the page cache before each timed copy, or dropped from it",
    )
    args = ap.parse_args()
    vmkit.ensure_libvirtd()
    asyncio.run(make_db())
    print(f"source disk {args.cache} before each timed copy")
    rows = {
        int(g): bench_size(int(g), args.rounds, args.dir, args.cache) for g in args.sizes.split(",")
    }
    print(
        "job = the backup job's process from its go (modules loaded, as in a running worker) "
        "to its exit; in-worker = claimed -> completed"
    )
    print(
        f"{'disk':>5} {'job s':>7} {'in-worker s':>11} {'convert s':>9} {'ratio':>6} "
        f"{'in-worker ratio':>15} {'peak RSS MB':>11} {'inc stored/written':>18}"
    )
    for gib, r in rows.items():
        print(
            f"{gib:>4}G {r['job']:7.2f} {r['in_worker']:11.2f} {r['convert']:9.2f} "
            f"{r['job'] / r['convert']:6.2f} {r['in_worker'] / r['convert']:15.2f} "
            f"{r['peak_rss'] / 1e6:11.0f} {r['inc_ratio']:18.3f}"
        )
    for gib, r in rows.items():
        print(
            f"{gib:>4}G best rounds (each side's least disturbed): in-worker "
            f"{r['best_in_worker']:.2f}s, reference {r['best_convert']:.2f}s, ratio "
            f"{r['best_in_worker'] / r['best_convert']:.2f}"
        )
    print("the job's parts alone (medians), each a floor under the job's time:")
    for gib, r in rows.items():
        print(
            f"{gib:>4}G libvirt push copy {r['push']:.2f}s = {r['push'] / r['convert']:.2f}x the "
            f"reference; sha256 of the copy {r['hash']:.2f}s = {r['hash'] / r['convert']:.2f}x"
        )
        print(
            f"{gib:>4}G copy + sha256 of the disk file, no QEMU: {r['floor']:.2f}s = "
            f"{r['floor'] / r['convert']:.2f}x the reference"
        )
    if len(rows) > 1:
        peaks = [r["peak_rss"] for r in rows.values()]
        print(f"peak RSS spread across sizes: {max(peaks) / min(peaks):.3f}x (target within 1.10x)")


if __name__ == "__main__":
    main()
