"""A hypervisor's libvirt_uri: an admin cannot write one that makes the worker run a program
(422 naming the field and the part refused); the forms an operator needs are accepted."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from tests.api.helpers import admin_with_headers, assert_problem
from tests.factories import create_hypervisor, create_location

REFUSED = [
    ("qemu+ext:///system?command=/usr/bin/id", "qemu+ext"),
    ("qemu+ssh://hv1/system?command=/tmp/evil", "command"),
    ("qemu+ssh://hv1/system?netcat=/tmp/evil", "netcat"),
    ("qemu+ssh://hv1/system?keyfile=/root/.ssh/id_other", "keyfile"),
    ("qemu+tcp://hv1/system", "qemu+tcp"),
    ("vbox+ssh://hv1/session", "vbox+ssh"),
]


@pytest.mark.parametrize(("uri", "part"), REFUSED)
async def test_an_unsafe_uri_is_422_naming_the_field_and_the_part(
    client: httpx.AsyncClient, session: AsyncSession, uri: str, part: str
) -> None:
    _, headers = await admin_with_headers(session)
    location = await create_location(session)
    created = await client.post(
        "/hypervisors",
        json={"name": "hv", "location_id": str(location.id), "libvirt_uri": uri},
        headers=headers,
    )
    body = assert_problem(created, 422, field="libvirt_uri")
    assert part in body["detail"], body

    hypervisor = await create_hypervisor(session)
    patched = await client.patch(
        f"/hypervisors/{hypervisor.id}", json={"libvirt_uri": uri}, headers=headers
    )
    body = assert_problem(patched, 422, field="libvirt_uri")
    assert part in body["detail"], body
    await session.refresh(hypervisor)
    assert hypervisor.libvirt_uri == "qemu:///system"


async def test_an_ssh_uri_with_a_user_port_and_no_tty_is_accepted(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    _, headers = await admin_with_headers(session)
    location = await create_location(session)
    uri = "qemu+ssh://backup@hv1.example.com:2222/system?no_tty=1"
    created = await client.post(
        "/hypervisors",
        json={"name": "hv", "location_id": str(location.id), "libvirt_uri": uri},
        headers=headers,
    )
    assert created.status_code == 201, created.text
    assert created.json()["libvirt_uri"] == uri

    tls = "qemu+tls://hv2.example.com/system"
    patched = await client.patch(
        f"/hypervisors/{created.json()['id']}", json={"libvirt_uri": tls}, headers=headers
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["libvirt_uri"] == tls
