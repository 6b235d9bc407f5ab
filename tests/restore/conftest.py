"""Restore tests reuse the worker fixtures (a real VM, local storage, committed sessions) and
add a real S3 server (``rclone serve s3``) and an API client over committed sessions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.storage import servers
from tests.storage.servers import Server
from tests.worker.conftest import (  # noqa: F401  (fixtures shared with the worker tests)
    World,
    libvirtd,
    make_vm,
    make_world,
    real_client,
    real_sessionmaker,
    scratch_dir,
    worker_ctx,
    world,
)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[Server]:
    try:
        server = servers.start_rclone_s3()
    except servers.ServerStartError as exc:
        pytest.fail(f"cannot start rclone serve s3: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()
