"""FTP-specific behaviour on pyftpdlib: login and TLS errors, a server dying mid-upload."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from app.storage import StorageUnreachable, get_driver
from app.storage.base import is_temp_name
from tests.storage import servers
from tests.storage.payloads import MiB, calling, payload
from tests.storage.servers import Server


@pytest.fixture
def doomed_ftp() -> Iterator[Server]:
    server = servers.start_ftp()
    yield server
    server.stop()


async def test_check_reports_a_wrong_password(ftp_server: Server) -> None:
    driver = get_driver("ftp", {**ftp_server.config, "password": "wrong"})

    result = await driver.check()

    assert not result.ok
    assert result.error == "cannot connect to the storage server (login refused)"
    assert result.detail == f"FTP login failed for user 'backup' at 127.0.0.1:{ftp_server.port}"


async def test_ftps_refuses_an_untrusted_certificate(ftps_server: Server) -> None:
    driver = get_driver("ftp", {**ftps_server.config, "ca_cert": None})

    result = await driver.check()

    assert not result.ok
    assert result.error == "cannot connect to the storage server (TLS handshake failed)"
    assert result.detail is not None
    assert result.detail.startswith(f"TLS handshake with FTP server 127.0.0.1:{ftps_server.port}")
    assert "certificate verify failed" in result.detail


async def test_plain_ftp_login_is_refused_by_a_tls_only_server(ftps_server: Server) -> None:
    driver = get_driver("ftp", {**ftps_server.config, "tls": False})

    result = await driver.check()

    assert not result.ok
    assert result.error is not None and "127.0.0.1" not in result.error
    assert result.detail is not None
    assert f"127.0.0.1:{ftps_server.port}" in result.detail


async def test_check_reports_a_refused_connection(ftp_server: Server) -> None:
    port = servers.free_port()
    driver = get_driver("ftp", {**ftp_server.config, "port": port})

    result = await driver.check()

    assert not result.ok
    assert result.error == "cannot connect to the storage server (connection refused)"
    assert result.detail is not None
    assert result.detail.startswith(f"cannot connect to FTP server 127.0.0.1:{port}")


async def test_server_killed_mid_upload_raises_unreachable_and_no_object_appears(
    doomed_ftp: Server, uid: str
) -> None:
    driver = get_driver("ftp", doomed_ftp.config)
    source = calling(payload(64 * MiB, seed=30), at=8 * MiB, action=doomed_ftp.kill)

    with pytest.raises(
        StorageUnreachable, match=re.escape(f"127.0.0.1:{doomed_ftp.port} lost while")
    ):
        await driver.put(f"{uid}/vda.qcow2", source)

    stored = [p for p in doomed_ftp.data_dir.rglob("*") if p.is_file()]
    assert all(is_temp_name(p.name) for p in stored)
    assert not (doomed_ftp.data_dir / uid / "vda.qcow2").exists()
