"""libvirt checkpoints (one dirty bitmap per covered disk): list, inspect, delete, prune, reset."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Collection

import libvirt

from app.virt._conn import Domain, error_code, error_text, open_domain
from app.virt.errors import VirtError

log = logging.getLogger(__name__)

# A normal delete that fails with one of these means the bitmap is already gone or unusable:
# only the metadata is left to remove.
_BROKEN_BITMAP_HINTS = ("not found in backing chain", "missing or broken bitmap", "inconsistent")


def checkpoint_names(dom: Domain) -> list[str]:
    """Checkpoint names, parents before children."""
    try:
        cps = dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
    except libvirt.libvirtError as exc:
        raise VirtError(f"Cannot list checkpoints of {dom.name()}: {error_text(exc)}") from exc
    return [str(cp.getName()) for cp in cps]


def checkpoint_disks(dom: Domain, name: str) -> dict[str, str] | None:
    """{disk target: checkpoint mode ('bitmap' / 'no')} of checkpoint ``name``; None if absent."""
    try:
        cp = dom.checkpointLookupByName(name, 0)
        xml = str(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
    except libvirt.libvirtError as exc:
        if error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            return None
        raise VirtError(f"Cannot read checkpoint {name}: {error_text(exc)}") from exc
    root = ET.fromstring(xml)
    return {
        str(d.get("name")): d.get("checkpoint", "bitmap")
        for d in root.findall("./disks/disk")
        if d.get("name")
    }


def delete_on_domain(dom: Domain, name: str, metadata_only: bool = False) -> bool:
    """Delete one checkpoint; False when it did not exist.

    A normal delete removes the QEMU bitmap too. When libvirt says that bitmap is already missing
    or broken (after QEMU was killed), the metadata alone is removed.
    """
    try:
        cp = dom.checkpointLookupByName(name, 0)
    except libvirt.libvirtError as exc:
        if error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            return False
        raise VirtError(f"Cannot look up checkpoint {name}: {error_text(exc)}") from exc
    if not metadata_only:
        try:
            cp.delete(0)
            return True
        except libvirt.libvirtError as exc:
            if error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                return False
            text = error_text(exc)
            broken = error_code(exc) == libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT or any(
                hint in text for hint in _BROKEN_BITMAP_HINTS
            )
            if not broken:
                raise VirtError(f"Cannot delete checkpoint {name}: {text}") from exc
            log.warning("checkpoint %s: bitmap unusable (%s); removing metadata only", name, text)
    try:
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    except libvirt.libvirtError as exc:
        if error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            return False
        raise VirtError(f"Cannot delete checkpoint {name}: {error_text(exc)}") from exc
    return True


def list_checkpoints(uri: str, domain: str) -> list[str]:
    """Names of the domain's checkpoints, oldest (parents) first."""
    with open_domain(uri, domain) as dom:
        return checkpoint_names(dom)


def delete_checkpoint(uri: str, domain: str, name: str) -> None:
    """Delete a checkpoint (and its bitmap); nothing happens when it does not exist."""
    with open_domain(uri, domain) as dom:
        delete_on_domain(dom, name)


def prune_checkpoints(uri: str, domain: str, keep: Collection[str]) -> list[str]:
    """Delete every checkpoint whose name is not in ``keep``; return the deleted names.

    Bitmaps of old checkpoints keep tracking writes and slow the guest down
    (docs/libvirt.md, pitfall 12).
    """
    keep_set = set(keep)
    deleted: list[str] = []
    with open_domain(uri, domain) as dom:
        for name in reversed(checkpoint_names(dom)):
            if name not in keep_set and delete_on_domain(dom, name):
                deleted.append(name)
    deleted.reverse()
    return deleted


def reset_checkpoints(uri: str, domain: str) -> None:
    """Forget every checkpoint (metadata only): recovery after QEMU was killed.

    docs/libvirt.md, pitfall 8.

    The next backup must be a full one with a new checkpoint.
    """
    with open_domain(uri, domain) as dom:
        for name in reversed(checkpoint_names(dom)):
            delete_on_domain(dom, name, metadata_only=True)
