"""SFTP-specific behaviour on OpenSSH: auth modes, host-key pinning, a server dying mid-upload."""

from __future__ import annotations

import re
from collections.abc import Iterator

import asyncssh
import psutil
import pytest

from app.storage import StorageUnreachable, get_driver, sftp
from app.storage.base import is_temp_name
from tests.storage import servers
from tests.storage.payloads import MiB, calling, chunked, payload, read_all
from tests.storage.servers import Server


@pytest.fixture
def doomed_sshd() -> Iterator[Server]:
    server = servers.start_sshd()
    yield server
    server.stop()


def password_config(server: Server, password: str) -> dict[str, object]:
    return {**server.config, "private_key": None, "password": password}


async def test_password_login_works(sshd_server: Server, uid: str) -> None:
    driver = get_driver("sftp", password_config(sshd_server, sshd_server.extra["password"]))

    assert (await driver.check()).ok
    await driver.put(f"{uid}/pw", chunked(b"via password"))
    assert await read_all(driver, f"{uid}/pw") == b"via password"
    await driver.close()


async def test_check_reports_a_wrong_password(sshd_server: Server) -> None:
    driver = get_driver("sftp", password_config(sshd_server, "not-the-password"))

    result = await driver.check()

    assert not result.ok
    assert result.error == "cannot connect to the storage server (login refused)"
    assert result.detail == f"SFTP login failed for user 'ibp-sftp' at 127.0.0.1:{sshd_server.port}"
    await driver.close()


async def test_check_reports_a_host_key_mismatch(sshd_server: Server) -> None:
    other_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    driver = get_driver("sftp", {**sshd_server.config, "host_key": other_key.strip()})

    result = await driver.check()

    assert not result.ok
    assert result.error == (
        "cannot connect to the storage server (the server's host key is not the pinned host_key)"
    )
    assert result.detail is not None
    assert result.detail.startswith(f"SFTP host key mismatch for 127.0.0.1:{sshd_server.port}")
    await driver.close()


async def test_check_reports_a_refused_connection(sshd_server: Server) -> None:
    port = servers.free_port()
    driver = get_driver("sftp", {**sshd_server.config, "port": port})

    result = await driver.check()

    assert not result.ok
    assert result.error == "cannot connect to the storage server (connection refused)"
    assert result.detail is not None
    assert result.detail.startswith(f"cannot connect to SFTP server 127.0.0.1:{port}")
    await driver.close()


def test_config_without_credentials_or_host_key_is_rejected(sshd_server: Server) -> None:
    with pytest.raises(ValueError, match="host_key"):
        get_driver("sftp", {**sshd_server.config, "host_key": ""})
    with pytest.raises(ValueError, match="'password' or a 'private_key'"):
        get_driver("sftp", {**sshd_server.config, "private_key": None})


async def test_server_killed_mid_upload_raises_unreachable_and_no_object_appears(
    doomed_sshd: Server, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sftp, "TEMP_REMOVAL_RETRY_DELAYS", (0.2,))  # it stays dead
    driver = get_driver("sftp", doomed_sshd.config)
    source = calling(payload(40 * MiB, seed=20), at=8 * MiB, action=doomed_sshd.kill)

    with pytest.raises(
        StorageUnreachable, match=re.escape(f"127.0.0.1:{doomed_sshd.port} lost while")
    ):
        await driver.put(f"{uid}/vda.qcow2", source)

    # The dead server cannot delete the temp file for us; it must at least never look
    # like the object, and list() hides it.
    stored = [p for p in doomed_sshd.data_dir.rglob("*") if p.is_file()]
    assert all(is_temp_name(p.name) for p in stored)
    assert not (doomed_sshd.data_dir / uid / "vda.qcow2").exists()
    await driver.close()


async def test_session_killed_mid_upload_removes_the_temp_file_on_a_new_connection(
    doomed_sshd: Server, uid: str
) -> None:
    """The sshd process serving the upload dies (the listener lives on): the driver connects
    again to remove its temp file, so nothing at all is left."""

    def kill_sessions() -> None:
        for child in psutil.Process(doomed_sshd.proc.pid).children(recursive=True):
            child.kill()

    driver = get_driver("sftp", doomed_sshd.config)
    source = calling(payload(40 * MiB, seed=21), at=8 * MiB, action=kill_sessions)

    with pytest.raises(StorageUnreachable, match="lost while writing"):
        await driver.put(f"{uid}/vda.qcow2", source)

    assert [p for p in doomed_sshd.data_dir.rglob("*") if p.is_file()] == []
    assert await driver.partial_uploads(f"{uid}/") == []
    await driver.close()
