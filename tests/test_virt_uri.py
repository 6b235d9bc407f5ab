"""The libvirt URIs a hypervisor may have (app/virt/uri.py), and the worker's connect refusing a
stored one that would make libvirt run a program, before libvirt sees it."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Hypervisor
from app.virt import VirtError
from app.virt._conn import connect
from app.virt.uri import UriRefused, check_libvirt_uri
from tests.factories import create_hypervisor

ALLOWED = [
    "qemu:///system",
    "qemu:///session",
    "qemu:///system?mode=legacy",
    "qemu+ssh://hv1.example.com/system",
    "qemu+ssh://backup@hv1.example.com:2222/system?no_tty=1&mode=direct",
    "qemu+ssh://root@[2001:db8::1]/system",
    "qemu+tls://10.0.0.7:16514/system",
]

# (uri, the part the refusal names)
REFUSED = [
    ("qemu+ext:///system?command=/usr/bin/id", "qemu+ext"),
    ("qemu+ssh://hv1/system?command=/tmp/evil", "command"),
    ("qemu+ssh://hv1/system?netcat=/tmp/evil", "netcat"),
    ("qemu+ssh://hv1/system?keyfile=/root/.ssh/other", "keyfile"),
    ("qemu+ssh://hv1/system?socket=/tmp/sock", "socket"),
    ("qemu+tls://hv1/system?no_verify=1", "no_verify"),
    ("qemu+tls://hv1/system?pkipath=/tmp", "pkipath"),
    ("qemu+ssh://hv1/system?no_tty=1;command=/tmp/evil", "';'"),
    ("qemu+ssh://hv1/system?comm%61nd=/tmp/evil", "'%'"),
    ("qemu+ssh://hv1/system?no_tty=yes", "no_tty"),
    ("qemu:///system?no_tty=1", "no_tty"),
    ("qemu+tcp://hv1/system", "qemu+tcp"),
    ("qemu+libssh2://hv1/system", "qemu+libssh2"),
    ("xen+ssh://hv1/system", "xen+ssh"),
    ("test:///default", "test"),
    ("qemu:///embed?root=/tmp/x", "/embed"),
    ("qemu://hv1/system", "hv1"),
    ("qemu+ssh:///system", "host"),
    ("qemu+ssh://-oProxyCommand=touch%20x/system", "'%'"),
    ("qemu+ssh://-oProxyCommand=x/system", "-oProxyCommand=x"),
    ("qemu+ssh://-l@hv1/system", "-l"),
    ("qemu+ssh://hv1:0/system", "'0'"),
    ("qemu+tls://admin@hv1/system", "admin"),
    ("myalias", "qemu:///system"),
    ("qemu:///system\n", "'\\n'"),
]


@pytest.mark.parametrize("uri", ALLOWED)
def test_the_forms_an_operator_needs_are_allowed(uri: str) -> None:
    assert check_libvirt_uri(uri) == uri


@pytest.mark.parametrize(("uri", "part"), REFUSED)
def test_everything_else_is_refused_naming_the_part(uri: str, part: str) -> None:
    with pytest.raises(UriRefused) as refused:
        check_libvirt_uri(uri)
    assert part in str(refused.value)


async def test_connect_refuses_a_stored_uri_before_libvirt_runs_its_command(
    session: AsyncSession, tmp_path: Path
) -> None:
    """A row written before the API checked URIs: the worker's connect refuses it, and the
    command it names never runs (libvirt would run it for the ext transport)."""
    ran = tmp_path / "ran"
    command = tmp_path / "evil"
    command.write_text(f"#!/bin/sh\ntouch {ran}\n")
    command.chmod(0o755)
    stored = await create_hypervisor(session, libvirt_uri=f"qemu+ext:///system?command={command}")
    uri = await session.scalar(select(Hypervisor.libvirt_uri).where(Hypervisor.id == stored.id))
    assert uri is not None

    with pytest.raises(VirtError) as refused, connect(uri):
        pass

    message = str(refused.value)
    assert message.startswith("Refusing to connect to the hypervisor")
    assert "'qemu+ext'" in message and "libvirt_uri" in message
    assert not ran.exists()
