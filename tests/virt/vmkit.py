"""Real throw-away QEMU VMs for tests (no guest OS needed: the BIOS idles, disks still work).

Generic on purpose: other test packages import it. Every VM made here is named ``ibp-test-...``
and recorded, so ``destroy_created_vms()`` can clean up what this process made (and only that).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import libvirt
import libvirt_qemu

from app.virt._conn import register_error_handler
from app.virt.demo import domain_xml

URI = os.environ.get("IBP_TEST_LIBVIRT_URI", "qemu:///system")
PREFIX = "ibp-test-"
MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
START_SCRIPT = REPO / "scripts" / "start-libvirtd.sh"

_created: set[str] = set()
_created_lock = threading.Lock()


@dataclass
class VM:
    name: str
    workdir: Path
    disks: dict[str, Path] = field(default_factory=dict)  # target -> qcow2 path
    uri: str = URI

    def disk(self, target: str) -> Path:
        return self.disks[target]


class VMFactory(Protocol):
    def __call__(
        self,
        label: str = ...,
        disks: list[tuple[str, int]] | None = ...,
        start: bool = ...,
        fill_from: dict[str, Path] | None = ...,
    ) -> VM: ...


def ensure_libvirtd() -> None:
    """Start libvirtd via scripts/start-libvirtd.sh; raise (never skip) when it cannot."""
    proc = subprocess.run(
        [str(START_SCRIPT)], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"libvirtd is required for these tests and could not be started "
            f"({START_SCRIPT} exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    register_error_handler()


def unique_name(label: str = "vm") -> str:
    return f"{PREFIX}{label}-{uuid.uuid4().hex[:8]}"


def _conn() -> Any:
    register_error_handler()
    return libvirt.open(URI)


def create_disk(path: Path, size: int, fill_from: Path | None = None) -> None:
    """An empty qcow2 of ``size`` bytes, or a qcow2 converted from a raw file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fill_from is None:
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)]
    else:
        cmd = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(fill_from), str(path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)


def define_vm(
    name: str,
    disks: list[tuple[str, int]],
    workdir: Path,
    *,
    start: bool = True,
    fill_from: dict[str, Path] | None = None,
) -> VM:
    """Create qcow2 disks, define and (by default) start a small TCG domain.

    ``disks`` is [(target, size_bytes), ...]; the first one is the boot disk (boot order 1).
    ``fill_from`` optionally maps a target to a raw file to initialise that disk from.
    """
    if not name.startswith(PREFIX):
        name = PREFIX + name
    workdir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for target, size in disks:
        path = workdir / f"{name}-{target}.qcow2"
        create_disk(path, size, (fill_from or {}).get(target))
        paths[target] = path
    xml = domain_xml(name, paths, boot_target=disks[0][0])
    conn = _conn()
    try:
        with _created_lock:
            _created.add(name)
        dom = conn.defineXML(xml)
        if start:
            dom.create()
    finally:
        conn.close()
    return VM(name=name, workdir=workdir, disks=paths)


def _alias(dom: Any, target: str) -> str:
    root = ET.fromstring(dom.XMLDesc(0))
    for el in root.findall("./devices/disk"):
        t = el.find("target")
        a = el.find("alias")
        if t is not None and t.get("dev") == target and a is not None:
            return str(a.get("name"))
    raise LookupError(f"disk {target} has no alias (is the domain running?)")


def hmp(domain: str, command: str) -> str:
    conn = _conn()
    try:
        dom = conn.lookupByName(domain)
        return str(
            libvirt_qemu.qemuMonitorCommand(
                dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
            )
        )
    finally:
        conn.close()


def write_pattern(domain: str, target: str, pattern_byte: int, offset: int, length: int) -> None:
    """Write ``length`` bytes of ``pattern_byte`` at ``offset`` into a running VM's disk.

    Goes through QEMU (``qemu-io`` over HMP), so dirty bitmaps see the write like a guest's.
    """
    conn = _conn()
    try:
        alias = _alias(conn.lookupByName(domain), target)
    finally:
        conn.close()
    cmd = f'qemu-io -d {alias}/virtio-backend "write -P {pattern_byte:#04x} {offset} {length}"'
    reply = hmp(domain, cmd).strip()
    if reply:
        raise RuntimeError(f"qemu-io write on {domain}/{target} failed: {reply}")


def snapshot_disk(domain: str, target: str, out_path: Path) -> Path:
    """Save the guest-visible content of a live disk now (raw) for a later comparison.

    Pauses the VM (QEMU drains and flushes on pause) while copying, resumes it afterwards.
    """
    conn = _conn()
    try:
        dom = conn.lookupByName(domain)
        root = ET.fromstring(dom.XMLDesc(0))
        source = None
        for el in root.findall("./devices/disk"):
            t = el.find("target")
            s = el.find("source")
            if t is not None and t.get("dev") == target and s is not None:
                source = s.get("file")
        if source is None:
            raise LookupError(f"{domain} has no file disk {target}")
        was_running = dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        if was_running:
            dom.suspend()
        try:
            subprocess.run(
                ["qemu-img", "convert", "-U", "-O", "raw", source, str(out_path)],
                check=True,
                capture_output=True,
                timeout=300,
            )
        finally:
            if was_running:
                dom.resume()
    finally:
        conn.close()
    return out_path


def qemu_pid(domain: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())


def destroy_vm(name: str) -> None:
    """Destroy (if running) and undefine the domain with its checkpoint metadata; delete disks."""
    conn = _conn()
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        root = ET.fromstring(dom.XMLDesc(0))
        files = [
            s.get("file")
            for s in root.findall("./devices/disk/source")
            if s.get("file") and Path(str(s.get("file"))).name.startswith(PREFIX)
        ]
        if dom.isActive():
            try:
                dom.destroy()
            except libvirt.libvirtError:
                if dom.isActive():
                    raise
        dom.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        )
        for f in files:
            Path(str(f)).unlink(missing_ok=True)
    finally:
        conn.close()
        with _created_lock:
            _created.discard(name)


def destroy_created_vms() -> list[str]:
    """Destroy every VM this process created and has not destroyed yet."""
    with _created_lock:
        names = sorted(_created)
    for name in names:
        destroy_vm(name)
    return names


def start_vm(name: str) -> None:
    conn = _conn()
    try:
        conn.lookupByName(name).create()
    finally:
        conn.close()


def kill_qemu(name: str, timeout: float = 10.0) -> None:
    """SIGKILL the domain's QEMU process (a host crash, as far as its disks can tell)."""
    pid = qemu_pid(name)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    conn = _conn()
    try:
        dom = conn.lookupByName(name)
        while dom.isActive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} still active {timeout}s after SIGKILL of QEMU")
            time.sleep(0.05)
    finally:
        conn.close()


def fill_disk(path: Path, pattern_byte: int, length: int, offset: int = 0) -> None:
    """Write a pattern into a qcow2 of a stopped VM (allocated data costs a backup as much as
    random data does: only all-zero clusters are skipped)."""
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            f"write -P {pattern_byte:#04x} {offset} {length}",
            str(path),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )


def qmp(domain: str, command: dict[str, Any]) -> Any:
    """Send one QMP command to the domain's QEMU; returns its "return" value."""
    import json

    conn = _conn()
    try:
        dom = conn.lookupByName(domain)
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(command), 0))
    finally:
        conn.close()
    if "error" in reply:
        raise RuntimeError(f"QMP {command['execute']} failed: {reply['error']}")
    return reply.get("return")


def throttle_block_jobs(domain: str, bytes_per_sec: int) -> int:
    """Slow every running block job (a backup job included) down; returns how many."""
    jobs = qmp(domain, {"execute": "query-block-jobs"}) or []
    slowed = 0
    for job in jobs:
        if job.get("status", "running") != "running":
            continue
        try:
            qmp(
                domain,
                {
                    "execute": "block-job-set-speed",
                    "arguments": {"device": job["device"], "speed": bytes_per_sec},
                },
            )
            slowed += 1
        except RuntimeError as exc:
            if "DeviceNotActive" not in str(exc) and "cannot accept" not in str(exc):
                # anything but "that job has just finished"
                raise
    return slowed
