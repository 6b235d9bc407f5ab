from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.virt import vmkit
from tests.virt.vmkit import MiB


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[str]:
    """libvirtd answering on qemu:///system (started if needed; fails loudly, never skips)."""
    vmkit.ensure_libvirtd()
    yield vmkit.URI
    vmkit.destroy_created_vms()


@pytest.fixture
def make_vm(libvirtd: str, tmp_path: Path) -> Iterator[vmkit.VMFactory]:
    """Factory for throw-away VMs; each is destroyed and undefined at teardown."""
    made: list[str] = []

    def factory(
        label: str = "vm",
        disks: list[tuple[str, int]] | None = None,
        start: bool = True,
        fill_from: dict[str, Path] | None = None,
    ) -> vmkit.VM:
        name = vmkit.unique_name(label)
        made.append(name)
        return vmkit.define_vm(
            name,
            disks or [("vda", 64 * MiB), ("vdb", 32 * MiB)],
            tmp_path / name,
            start=start,
            fill_from=fill_from,
        )

    yield factory
    for name in made:
        vmkit.destroy_vm(name)


@pytest.fixture
def vm(make_vm: vmkit.VMFactory, request: pytest.FixtureRequest) -> vmkit.VM:
    """A running VM with a boot disk vda (64 MiB) and a data disk vdb (32 MiB)."""
    label = re.sub(r"[^a-z0-9]+", "-", request.node.name.removeprefix("test_").lower())
    return make_vm(label[:20].strip("-") or "vm")
