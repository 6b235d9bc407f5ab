"""A small VM to try backups on: TCG, no guest OS (the BIOS idles, its disks still work).

`ibp demo-vm` uses it so a new user can take and restore real backups without writing
libvirt XML; the tests build their throw-away VMs from the same domain definition.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from app.virt._conn import connect, error_code

DEMO_FILL_BYTE = 0x5A


def domain_xml(name: str, disks: dict[str, Path], boot_target: str, memory_mib: int = 64) -> str:
    """A minimal x86_64 TCG domain with one virtio qcow2 disk per entry (target -> path)."""
    disk_xml = []
    for target, path in disks.items():
        boot = "<boot order='1'/>" if target == boot_target else ""
        disk_xml.append(
            f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{path}'/>
      <target dev='{target}' bus='virtio'/>{boot}
    </disk>"""
        )
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_crash>destroy</on_crash>
  <devices>{"".join(disk_xml)}
    <memballoon model='none'/>
  </devices>
</domain>"""


def ensure_demo_vm(uri: str, name: str, disk: Path, size_bytes: int, data_bytes: int) -> None:
    """Create the disk (its first `data_bytes` written), define and start the domain; each
    step is skipped when already done, so running it again only starts a stopped VM."""
    import libvirt

    if not disk.exists():
        disk.parent.mkdir(parents=True, exist_ok=True)
        _run("qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(size_bytes))
        if data_bytes:
            write = f"write -P {DEMO_FILL_BYTE:#04x} 0 {data_bytes}"
            _run("qemu-io", "-f", "qcow2", "-c", write, str(disk))
    with connect(uri) as conn:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if error_code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            dom = conn.defineXML(domain_xml(name, {"vda": disk}, boot_target="vda"))
        if not dom.isActive():
            dom.create()


def _run(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {(done.stderr or done.stdout).strip()}")
