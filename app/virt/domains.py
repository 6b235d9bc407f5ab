"""Domain facts: state in words, file-backed disks with their boot flag and virtual size."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import libvirt

from app.virt._conn import Domain, error_text, open_domain
from app.virt.errors import DomainNotRunning, VirtError

# Same words as `virsh domstate`.
_STATE_WORDS: dict[int, str] = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "idle",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "in shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}
# States in which QEMU runs the guest and a backup job can start.
_RUNNING_STATES = {libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED}


@dataclass(frozen=True)
class DiskInfo:
    target: str  # "vda"
    source: str  # path of the top image file
    boot: bool
    size_bytes: int  # virtual size seen by the guest
    format: str  # "qcow2", "raw", ...


@dataclass(frozen=True)
class _XmlDisk:
    target: str
    device: str
    type: str
    source: str | None
    format: str
    boot_order: int | None


def state_word(state: int) -> str:
    return _STATE_WORDS.get(state, f"unknown ({state})")


def state_of(dom: Domain) -> tuple[int, str]:
    try:
        state = int(dom.state()[0])
    except libvirt.libvirtError as exc:
        raise VirtError(
            f"Cannot read the state of instance {dom.name()}: {error_text(exc)}"
        ) from exc
    return state, state_word(state)


def require_running(dom: Domain) -> None:
    """Raise DomainNotRunning unless the domain is running."""
    state, word = state_of(dom)
    if state not in _RUNNING_STATES:
        raise DomainNotRunning(word)


def domain_state(uri: str, domain: str) -> str:
    """The domain state in words: "running", "paused", "shut off", "crashed", ..."""
    with open_domain(uri, domain) as dom:
        return state_of(dom)[1]


def xml_disks(dom_xml: str) -> list[_XmlDisk]:
    """Every ``<disk>`` of a domain XML, in document order."""
    root = ET.fromstring(dom_xml)
    disks: list[_XmlDisk] = []
    for el in root.findall("./devices/disk"):
        target_el = el.find("target")
        if target_el is None or not target_el.get("dev"):
            continue
        source_el = el.find("source")
        source = None
        if source_el is not None:
            source = source_el.get("file") or source_el.get("dev") or source_el.get("name")
        driver_el = el.find("driver")
        fmt = (driver_el.get("type") if driver_el is not None else None) or "raw"
        boot_el = el.find("boot")
        order: int | None = None
        if boot_el is not None and boot_el.get("order"):
            order = int(boot_el.get("order", "0"))
        disks.append(
            _XmlDisk(
                target=str(target_el.get("dev")),
                device=el.get("device", "disk"),
                type=el.get("type", "file"),
                source=source,
                format=fmt,
                boot_order=order,
            )
        )
    return disks


def _file_disks(dom_xml: str) -> list[_XmlDisk]:
    return [d for d in xml_disks(dom_xml) if d.device == "disk" and d.type == "file" and d.source]


def _boot_target(disks: list[_XmlDisk]) -> str | None:
    if not disks:
        return None
    ordered = [d for d in disks if d.boot_order is not None]
    if ordered:
        return min(ordered, key=lambda d: d.boot_order or 0).target
    # <os><boot dev='hd'/> (or no boot element): the first disk is the one the BIOS boots.
    return disks[0].target


def _virtual_size(dom: Domain, disk: _XmlDisk) -> int:
    try:
        capacity = int(dom.blockInfo(disk.target)[0])
        if capacity > 0:
            return capacity
    except libvirt.libvirtError:
        pass
    from app.virt.images import image_info  # local import: images has no libvirt dependency

    info = image_info(Path(str(disk.source)))
    return int(info["virtual-size"])


def list_disks(uri: str, domain: str) -> list[DiskInfo]:
    """The domain's file-backed ``device='disk'`` disks, boot disk flagged."""
    with open_domain(uri, domain) as dom:
        try:
            dom_xml = str(dom.XMLDesc(0))
        except libvirt.libvirtError as exc:
            raise VirtError(f"Cannot read the definition of {domain}: {error_text(exc)}") from exc
        disks = _file_disks(dom_xml)
        boot = _boot_target(disks)
        return [
            DiskInfo(
                target=d.target,
                source=str(d.source),
                boot=d.target == boot,
                size_bytes=_virtual_size(dom, d),
                format=d.format,
            )
            for d in disks
        ]
