"""Upload throughput and peak RSS of each storage driver against its protocol's reference client.

Run by hand (as root, for sshd):  .venv/bin/python bench/storage_bench.py [--size-gib N] [--big]
Each upload runs in its own subprocess, so its peak RSS (VmHWM) is the upload's alone;
driver and reference alternate on the same server in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB = 1024**3
# "local-seq": the same local driver against a plain sequential copy (read/write loop).
KINDS = ["local", "local-seq", "s3", "sftp", "ftp"]
REFERENCE = {
    "local": "shutil.copyfile+fsync",
    "local-seq": "1 MiB read/write loop+fsync",
    "s3": "boto3 upload_file",
    "sftp": "asyncssh sftp.put",
    "ftp": "aioftp upload",
}


# ---- child side: one upload, reports seconds and its own peak RSS ----------------------------


async def driver_upload(kind: str, config: dict[str, Any], src: str, key: str) -> str:
    from app.storage import get_driver, iter_file

    driver = get_driver(_driver_kind(kind), config)
    try:
        # As the backup job streams an image: 4 MiB pieces, the size known up front.
        size = Path(src).stat().st_size
        result = await driver.put(key, iter_file(src, 4 * 1024 * 1024), size)
    finally:
        await driver.close()
    return result.sha256


def _driver_kind(kind: str) -> str:
    return "local" if kind == "local-seq" else kind


async def reference_upload(kind: str, config: dict[str, Any], src: str, key: str) -> str:
    if kind in ("local", "local-seq"):
        dst = Path(config["path"]) / key
        dst.parent.mkdir(parents=True, exist_ok=True)
        if kind == "local":
            shutil.copyfile(src, dst)  # sendfile: the copy stays inside the kernel
        else:
            with open(src, "rb") as fsrc, open(dst, "wb") as fdst:
                shutil.copyfileobj(fsrc, fdst, 1024 * 1024)
        with dst.open("rb+") as f:
            os.fsync(f.fileno())
    elif kind == "s3":
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=config["endpoint_url"],
            aws_access_key_id=config["access_key_id"],
            aws_secret_access_key=config["secret_access_key"],
            region_name=config["region"],
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        client.upload_file(src, config["bucket"], key)
    elif kind == "sftp":
        import asyncssh

        async with (
            asyncssh.connect(
                config["host"],
                config["port"],
                username=config["username"],
                client_keys=[asyncssh.import_private_key(config["private_key"])],
                known_hosts=asyncssh.import_known_hosts(
                    f"[{config['host']}]:{config['port']} {config['host_key']}\n"
                ),
                agent_path=None,
            ) as conn,
            conn.start_sftp_client() as sftp,
        ):
            dst = f"{config['path']}/{key}"
            await sftp.makedirs(os.path.dirname(dst), exist_ok=True)
            await sftp.put(src, dst)
    elif kind == "ftp":
        import aioftp

        async with aioftp.Client.context(
            config["host"], config["port"], config["username"], config["password"]
        ) as client:
            await client.upload(src, f"{config['path'].rstrip('/')}/{key}", write_into=True)
    return ""


def child(args: argparse.Namespace) -> None:
    config = json.loads(args.config)
    upload = driver_upload if args.child == "driver" else reference_upload
    # Import everything before the clock starts: we time the transfer, not interpreter setup.
    import importlib

    from app.storage import get_driver

    if args.child == "driver":
        get_driver(_driver_kind(args.kind), config)
    elif not args.kind.startswith("local"):
        importlib.import_module({"s3": "boto3", "sftp": "asyncssh", "ftp": "aioftp"}[args.kind])
    started = time.perf_counter()
    digest = asyncio.run(upload(args.kind, config, args.src, args.key))
    seconds = time.perf_counter() - started
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent.
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "sha256": digest}))


# ---- parent side ------------------------------------------------------------------------------


def run_child(who: str, kind: str, config: dict[str, Any], src: Path, key: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", who, "--kind", kind, "--src", str(src)]
    cmd += ["--key", key, "--config", json.dumps(config)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{who} upload for {kind} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def memory_backed(store: Path, size: int) -> Path:
    """Put a server's storage directory on a tmpfs, keeping its owner and mode.

    The comparison is between two clients of the same server. On these VMs a disk write costs
    from 0.3 s to 3 s per GiB depending on the disk's and the memory's recent history, which
    would swamp the difference between the clients; with the server storing into memory the
    protocol and the clients are what is measured. ``--server-disk`` keeps the disk.
    """
    st = store.stat()
    subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={size},mode={st.st_mode & 0o7777:o}",
            "tmpfs",
            str(store),
        ],
        check=True,
    )
    os.chown(store, st.st_uid, st.st_gid)
    return store


def make_source(directory: Path, size: int) -> tuple[Path, str]:
    src, digest = directory / "source.bin", hashlib.sha256()
    block = 16 * 1024 * 1024
    with src.open("wb") as f:
        for _ in range(size // block):
            data = os.urandom(block)
            digest.update(data)
            f.write(data)
    return src, digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--big", action="store_true", help="4 GiB file")
    parser.add_argument("--rounds", type=int, default=2, help="alternating pairs per protocol")
    parser.add_argument("--only", nargs="*", choices=KINDS, default=KINDS)
    parser.add_argument(
        "--server-disk",
        action="store_true",
        help="S3/SFTP/FTP servers store on disk (default: on a tmpfs, see memory_backed)",
    )
    parser.add_argument("--child", choices=["driver", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from tests.storage import servers

    size = int((4.0 if args.big else args.size_gib) * GiB)
    work = Path(tempfile.mkdtemp(prefix="ibp-bench-", dir="/var/tmp"))
    started: list[servers.Server] = []
    mounted: list[Path] = []
    try:
        print(f"writing a {size / GiB:g} GiB random source file ...", flush=True)
        src, expected = make_source(work, size)
        from bench._disk import prime_free_space

        # Each upload is written by its server into this same disk, then deleted.
        prime_free_space(work, 2 * size)
        targets: dict[str, tuple[dict[str, Any], Path]] = {}
        (work / "local").mkdir()
        targets["local"] = ({"path": str(work / "local")}, work / "local")
        targets["local-seq"] = targets["local"]
        for kind, start in [
            ("s3", servers.start_rclone_s3),
            ("sftp", servers.start_sshd),
            ("ftp", servers.start_ftp),
        ]:
            if kind in args.only:
                server = start()
                started.append(server)
                store = server.data_dir / "backups" if kind == "s3" else server.data_dir
                if not args.server_disk:
                    mounted.append(memory_backed(store, 2 * size + GiB))
                targets[kind] = (server.config, store)
        print(
            f"\n{'protocol':8} {'driver MB/s':>12} {'reference':>24} {'ratio':>6}"
            f" {'driver peak RSS':>16} {'ref peak RSS':>13}"
        )
        for kind in args.only:
            config, store = targets[kind]
            runs: dict[str, list[dict[str, Any]]] = {"driver": [], "reference": []}
            for n in range(args.rounds):
                for who in ("driver", "reference") if n % 2 == 0 else ("reference", "driver"):
                    result = run_child(who, kind, config, src, f"bench/{who}-{n}/vda.qcow2")
                    if who == "driver" and result["sha256"] != expected:
                        raise SystemExit(f"{kind} driver returned a wrong sha256")
                    runs[who].append(result)
                    shutil.rmtree(store / "bench", ignore_errors=True)
            for w in runs:
                times = " ".join(f"{r['seconds']:.2f}" for r in runs[w])
                print(f"  {kind} {w} seconds, in run order: {times}", flush=True)
            mbps = {w: statistics.median(size / r["seconds"] / 1e6 for r in runs[w]) for w in runs}
            rss = {w: max(r["peak_rss"] for r in runs[w]) / 1e6 for w in runs}
            ref = f"{mbps['reference']:.0f} ({REFERENCE[kind]})"
            ratio = mbps["driver"] / mbps["reference"]
            print(
                f"{kind:8} {mbps['driver']:12.0f} {ref:>24} {ratio:6.2f}"
                f" {rss['driver']:13.0f} MB {rss['reference']:10.0f} MB",
                flush=True,
            )
    finally:
        for point in mounted:
            subprocess.run(["umount", "-l", str(point)], check=False)
        for server in started:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return None


if __name__ == "__main__":
    main()
