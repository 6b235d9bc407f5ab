"""Real storage servers on loopback (session-scoped) and a `backend` fixture over every driver."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.storage import BackupStorageDriver, get_driver
from app.storage.base import temp_name
from tests.storage import servers
from tests.storage.servers import Server

MiB = 1024 * 1024
TEST_PART_SIZE = 5 * MiB  # S3's minimum, so multi-part paths run on small objects


@dataclass
class Backend:
    name: str
    kind: str
    config: dict[str, Any]
    server: Server | None = None
    root: Path | None = None  # directory holding the stored files, when there is one

    def driver(self, **overrides: Any) -> BackupStorageDriver:
        return get_driver(self.kind, {**self.config, **overrides})

    def stored_names(self) -> list[str]:
        """Everything physically stored, including temp files and unfinished S3 uploads."""
        names: list[str] = []
        if self.root is not None:
            for dirpath, _dirs, files in os.walk(self.root):
                names += [os.path.relpath(os.path.join(dirpath, f), self.root) for f in files]
        if self.kind == "s3" and self.server is not None:
            admin = servers.s3_admin(self.server)
            bucket = self.config["bucket"]
            if self.root is None:
                for page in admin.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                    names += [obj["Key"] for obj in page.get("Contents", [])]
            uploads = admin.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            names += [f"{u['Key']} (unfinished multipart upload)" for u in uploads]
        return sorted(names)

    def leave_partial(self, key: str) -> str:
        """Leave what a writer killed mid-put leaves behind, made on the server itself: a temp
        file beside `key`, or an S3 multipart upload with a part sent and never completed.
        Returns the partial's handle (temp key or UploadId)."""
        if self.kind == "s3":
            assert self.server is not None
            admin = servers.s3_admin(self.server)
            bucket, s3_key = self.config["bucket"], self.config["prefix"] + key
            upload_id: str = admin.create_multipart_upload(Bucket=bucket, Key=s3_key)["UploadId"]
            admin.upload_part(
                Bucket=bucket, Key=s3_key, UploadId=upload_id, PartNumber=1, Body=b"x" * MiB
            )
            return upload_id
        assert self.root is not None
        temp = temp_name(key)
        path = self.root / temp
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"the first MiB of a disk image" * 1000)
        # Owned like the root, as the server's own writes are (the SFTP user must delete it).
        owner = self.root.stat()
        while path != self.root:
            os.chown(path, owner.st_uid, owner.st_gid)
            path = path.parent
        return temp


def _start(factory: Any) -> Iterator[Server]:
    try:
        server = factory()
    except servers.ServerStartError as exc:
        pytest.fail(f"cannot start test server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def rclone_server() -> Iterator[Server]:
    yield from _start(servers.start_rclone_s3)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[Server]:
    yield from _start(servers.start_moto)


@pytest.fixture(scope="session")
def sshd_server() -> Iterator[Server]:
    yield from _start(servers.start_sshd)


@pytest.fixture(scope="session")
def ftp_server() -> Iterator[Server]:
    yield from _start(servers.start_ftp)


@pytest.fixture(scope="session")
def ftps_server() -> Iterator[Server]:
    yield from _start(lambda: servers.start_ftp(tls=True))


@contextlib.contextmanager
def mounted_tmpfs(size: str) -> Iterator[Path]:
    """A real mount point (stands in for an NFS share) that the tests own."""
    point = Path(tempfile.mkdtemp(prefix="ibp-mnt-", dir="/var/tmp"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)])
    if done.returncode != 0:
        point.rmdir()
        pytest.fail(f"cannot mount a tmpfs on {point} (needs root / CAP_SYS_ADMIN)", pytrace=False)
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=False)
        point.rmdir()


@pytest.fixture(scope="session")
def nfs_mount() -> Iterator[Path]:
    with mounted_tmpfs("512m") as point:
        yield point


BACKENDS = ["local", "nfs", "s3-rclone", "s3-moto", "sftp", "ftp", "ftps"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    # Servers start lazily, so `-k local` does not need sshd.
    name = request.param
    if name == "local":
        return Backend(name, "local", {"path": str(tmp_path)}, root=tmp_path)
    if name == "nfs":
        point: Path = request.getfixturevalue("nfs_mount")
        return Backend(name, "nfs", {"path": str(point)}, root=point)
    if name.startswith("s3"):
        server: Server = request.getfixturevalue(f"{name[3:]}_server")
        root = server.data_dir / server.config["bucket"] if name == "s3-rclone" else None
        config = {**server.config, "part_size": TEST_PART_SIZE}
        return Backend(name, "s3", config, server, root)
    server = request.getfixturevalue(f"{'sshd' if name == 'sftp' else name}_server")
    kind = "sftp" if name == "sftp" else "ftp"
    return Backend(name, kind, server.config, server, server.data_dir)


@pytest.fixture
async def driver(backend: Backend) -> AsyncIterator[BackupStorageDriver]:
    drv = backend.driver()
    yield drv
    await drv.close()


@pytest.fixture
def uid() -> str:
    """A unique first key segment, so tests never see each other's objects."""
    return f"inst-{secrets.token_hex(4)}"
