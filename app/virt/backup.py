"""Pull-mode backup jobs through libvirt's backup API: the blocking libvirt half.

``begin_pull`` starts a job that exports each selected disk, as it was at that instant, over
NBD on a unix socket, and creates the new checkpoint with it; ``finish_pull`` ends it
(``abortJob`` is the only way a pull job ends) and, on failure, drops the checkpoint so the
chain never advances past a backup that does not exist. Reading the exports is
``app.virt.pull``'s part.

Copy-before-write keeps the exports at the job's instant: a block the guest overwrites while
the job runs is first copied into a scratch file per disk under ``scratch_dir``, which so holds
only what the guest wrote meanwhile, not a copy of the disk.
"""

from __future__ import annotations

import logging
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import libvirt

from app.virt._conn import Domain, error_code, error_text, open_domain
from app.virt.checkpoints import checkpoint_disks, checkpoint_names, delete_on_domain
from app.virt.domains import require_running, state_of, xml_disks
from app.virt.errors import CheckpointBroken, DiskBusy, DomainStopped, VirtError

log = logging.getLogger(__name__)

ABORT_WAIT = 60.0
SETTLE_WAIT = 10.0
# QEMU's death reaches libvirt (the domain turns inactive) a moment after its monitor stops
# answering: how long a failing job query on a domain still called running is looked at again.
STOP_GRACE = 5.0

_BROKEN_HINTS = ("checkpoint inconsistent", "missing or broken bitmap")


# Linux's limit on a unix socket's path (sun_path is 108 bytes with its NUL). The job's socket
# is <scratch_dir>/ibp-<backup uuid>.sock: the longest scratch folder that leaves room for it.
_SOCKET_PATH_MAX = 107
SCRATCH_DIR_MAX = _SOCKET_PATH_MAX - len(f"/ibp-{uuid.UUID(int=0)}.sock")


@dataclass(frozen=True)
class Export:
    target: str  # "vda"
    name: str  # the NBD export's name
    bitmap: str | None  # an incremental's dirty bitmap: meta context qemu:dirty-bitmap:<bitmap>


@dataclass(frozen=True)
class PullJob:
    """A running pull-mode backup job."""

    domain: str
    socket: Path
    exports: tuple[Export, ...]
    scratch: tuple[Path, ...]
    checkpoint: str
    run_id: int | None  # the domain's ID when it began: tells a restarted QEMU apart


def _check_name(kind: str, value: str) -> None:
    if not value or "/" in value or value.startswith(".") or any(c.isspace() for c in value):
        raise VirtError(f"Invalid {kind} name {value!r}")


def pull_xml(
    all_targets: list[str], socket: Path, scratch: dict[str, Path], incremental_from: str | None
) -> str:
    parts = ["<domainbackup mode='pull'>"]
    if incremental_from is not None:
        parts.append(f"<incremental>{_text(incremental_from)}</incremental>")
    parts.append(f"<server transport='unix' socket={quoteattr(str(socket))}/><disks>")
    for target in all_targets:
        if target in scratch:
            parts.append(
                f"<disk name={quoteattr(target)} backup='yes' type='file'>"
                f"<scratch file={quoteattr(str(scratch[target]))}/></disk>"
            )
        else:
            parts.append(f"<disk name={quoteattr(target)} backup='no'/>")
    parts.append("</disks></domainbackup>")
    return "".join(parts)


def exports_of(backup_xml: str, targets: list[str]) -> tuple[Export, ...]:
    """Each selected disk's export, from ``backupGetXMLDesc``."""
    found: dict[str, Export] = {}
    for disk in ET.fromstring(backup_xml).iter("disk"):
        target, name = disk.get("name"), disk.get("exportname")
        if target in targets and disk.get("backup", "yes") == "yes":
            found[target] = Export(target, name or target, disk.get("exportbitmap"))
    missing = [t for t in targets if t not in found]
    if missing:
        raise VirtError(f"The backup job exports no disk {', '.join(missing)}")
    return tuple(found[t] for t in targets)


def checkpoint_xml(all_targets: list[str], selected: list[str], name: str) -> str:
    disks = "".join(
        f"<disk name={quoteattr(t)} checkpoint={quoteattr('bitmap' if t in selected else 'no')}/>"
        for t in all_targets
    )
    return f"<domaincheckpoint><name>{_text(name)}</name><disks>{disks}</disks></domaincheckpoint>"


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _job_stats(dom: Domain, flags: int = 0) -> dict[str, Any]:
    try:
        stats: dict[str, Any] = dom.jobStats(flags)
    except libvirt.libvirtError as exc:
        raise VirtError(f"Cannot read the job state of {dom.name()}: {error_text(exc)}") from exc
    return stats


def _job_active(dom: Domain) -> bool:
    jtype = int(_job_stats(dom).get("type", libvirt.VIR_DOMAIN_JOB_NONE))
    return bool(jtype != libvirt.VIR_DOMAIN_JOB_NONE)


def _wait_job_end(dom: Domain, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _job_active(dom):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _abort(dom: Domain) -> None:
    try:
        dom.abortJob()
    except libvirt.libvirtError as exc:
        if _job_active(dom):
            raise VirtError(
                f"Cannot abort the backup job of {dom.name()}: {error_text(exc)}"
            ) from exc
    if not _wait_job_end(dom, ABORT_WAIT):
        raise VirtError(f"The backup job of {dom.name()} did not stop within {ABORT_WAIT:.0f}s")


def _domain_id(dom: Domain) -> int | None:
    """The domain's ID now: -1 while it is shut off, a new one at each start, None once it is
    undefined. (``dom.ID()`` is the ID the handle was looked up with, never refreshed.)"""
    try:
        return int(dom.connect().lookupByUUID(dom.UUID()).ID())
    except libvirt.libvirtError as exc:
        if error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise VirtError(f"Cannot look up instance {dom.name()}: {error_text(exc)}") from exc


def _stopped(dom: Domain, run_id: int | None) -> DomainStopped | None:
    """DomainStopped when the QEMU process that ran the job (domain ID ``run_id``) is gone:
    killed, crashed or shut down, even if the domain was started again since. None while it
    runs and answers, or when libvirt cannot tell (then what it said about the job stands)."""
    deadline = time.monotonic() + STOP_GRACE
    try:
        while True:
            now = _domain_id(dom)
            if now is None or now == -1 or now != run_id:
                return DomainStopped("undefined" if now is None else state_of(dom)[1])
            try:
                dom.jobStats(0)
                return None  # its monitor answers: the process runs
            except libvirt.libvirtError:
                if time.monotonic() >= deadline:
                    return None
            time.sleep(0.05)
    except VirtError as exc:
        log.warning("cannot tell whether %s still runs: %s", dom.name(), exc)
        return None


def _broken(text: str) -> bool:
    return any(h in text for h in _BROKEN_HINTS)


def _preflight(
    dom: Domain, targets: list[str], checkpoint: str, incremental_from: str | None
) -> list[str]:
    """Checks before starting; returns every disk target of the domain (for the XML)."""
    require_running(dom)
    try:
        dom_xml = str(dom.XMLDesc(0))
    except libvirt.libvirtError as exc:
        raise VirtError(f"Cannot read the definition of {dom.name()}: {error_text(exc)}") from exc
    disks = xml_disks(dom_xml)
    by_target = {d.target: d for d in disks}
    for t in targets:
        d = by_target.get(t)
        if d is None or d.device != "disk":
            raise VirtError(f"Instance {dom.name()} has no disk {t}")
        if d.type != "file" or not d.source:
            raise VirtError(f"Disk {t} of {dom.name()} is not backed by a file")
    names = checkpoint_names(dom)
    if checkpoint in names:
        raise VirtError(f"Checkpoint {checkpoint} already exists on instance {dom.name()}")
    if incremental_from is not None:
        cover = checkpoint_disks(dom, incremental_from)
        if cover is None:
            raise CheckpointBroken(
                f"Parent checkpoint {incremental_from} no longer exists on the hypervisor"
            )
        for t in targets:
            if cover.get(t) != "bitmap":
                raise CheckpointBroken(
                    f"Parent checkpoint {incremental_from} does not track disk {t}"
                )
    if _job_active(dom):
        raise DiskBusy(targets[0])
    for t in targets:
        try:
            info = dom.blockJobInfo(t, 0)
        except libvirt.libvirtError as exc:
            raise VirtError(f"Cannot query block jobs of disk {t}: {error_text(exc)}") from exc
        if info:
            raise DiskBusy(t)
    return [d.target for d in disks if d.device in ("disk", "lun")]


def _remove(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError as exc:  # pragma: no cover - best effort
            log.warning("could not remove scratch file %s: %s", p, exc)


def scratch_files(scratch_dir: Path, checkpoint: str, targets: list[str]) -> dict[str, Path]:
    return {t: scratch_dir / f"{checkpoint}-{t}.scratch" for t in targets}


def socket_path(scratch_dir: Path, checkpoint: str) -> Path:
    return scratch_dir / f"{checkpoint}.sock"


def begin_pull(
    uri: str,
    domain: str,
    targets: list[str],
    scratch_dir: Path,
    checkpoint: str,
    incremental_from: str | None,
) -> PullJob:
    """Start a pull-mode backup of ``targets`` of a running domain and create ``checkpoint``.

    Full when ``incremental_from`` is None, else each export comes with the dirty bitmap of
    the blocks changed since that checkpoint. On failure nothing is left: no job, no scratch
    file, no checkpoint. The caller must end the job with ``finish_pull``.
    """
    if not targets:
        raise VirtError("No disk selected for backup")
    if len(set(targets)) != len(targets):
        raise VirtError(f"Disk selected twice: {targets}")
    _check_name("checkpoint", checkpoint)
    if incremental_from is not None:
        _check_name("checkpoint", incremental_from)
        if incremental_from == checkpoint:
            raise VirtError("A checkpoint cannot be its own parent")
    socket = socket_path(scratch_dir, checkpoint)
    if len(str(socket).encode()) > _SOCKET_PATH_MAX:
        raise VirtError(
            f"The scratch directory {scratch_dir} is too long a path for the backup's NBD socket"
            f" (at most {_SOCKET_PATH_MAX - len(socket.name) - 1} characters)"
        )
    scratch_dir.mkdir(parents=True, exist_ok=True)
    scratch = scratch_files(scratch_dir, checkpoint, targets)
    leftovers = [*scratch.values(), socket]

    with open_domain(uri, domain) as dom:
        all_targets = _preflight(dom, targets, checkpoint, incremental_from)
        _remove(leftovers)  # of a killed run: libvirt refuses an existing scratch file
        run_id = _domain_id(dom)  # _preflight saw it running
        bxml = pull_xml(all_targets, socket, scratch, incremental_from)
        cxml = checkpoint_xml(all_targets, targets, checkpoint)
        try:
            dom.backupBegin(bxml, cxml, 0)
        except libvirt.libvirtError as exc:
            _remove(leftovers)
            text = error_text(exc)
            if error_code(exc) == libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT or _broken(text):
                raise CheckpointBroken(
                    f"Checkpoint {incremental_from} cannot be used: {text}"
                ) from exc
            raise VirtError(f"The backup of {domain} could not start: {text}") from exc
        job = PullJob(domain, socket, (), tuple(scratch.values()), checkpoint, run_id)
        try:
            exports = exports_of(str(dom.backupGetXMLDesc(0)), targets)
        except (libvirt.libvirtError, ET.ParseError, VirtError) as exc:
            _end(dom, job, ok=False)
            raise VirtError(f"Cannot read the backup job of {domain}: {error_text(exc)}") from exc
        return PullJob(domain, socket, exports, job.scratch, checkpoint, run_id)


def finish_pull(uri: str, job: PullJob, failure: BaseException | None = None) -> None:
    """End the job; remove its scratch files and socket.

    With no ``failure`` (every export was read whole) the job must still be running, else what
    was read cannot be trusted: VirtError. With one, the checkpoint is deleted too, and when
    the domain's QEMU process is gone, DomainStopped says so (the caller raises it in place of
    what the NBD client saw).
    """
    with open_domain(uri, job.domain) as dom:
        stopped = _stopped(dom, job.run_id) if failure is not None else None
        if stopped is not None:  # the job went with the process: nothing left to abort
            _remove([*job.scratch, job.socket])
            _rollback_checkpoint(dom, job.checkpoint)
            raise stopped
        _end(dom, job, ok=failure is None)


def _end(dom: Domain, job: PullJob, ok: bool) -> None:
    try:
        ended = _ended_why(dom)
        if ended is None:
            _abort(dom)
        elif ok:
            ok = False
            raise VirtError(f"The backup job ended on the hypervisor before it was read: {ended}")
    finally:
        _resume_if_stalled(dom)
        _remove([*job.scratch, job.socket])
        if not ok:
            _rollback_checkpoint(dom, job.checkpoint)


def _resume_if_stalled(dom: Domain) -> None:
    """A guest write whose copy-before-write failed (scratch full) pauses the VM by default;
    it goes on, its write retried, once the job is gone (docs/libvirt.md, pitfall 15)."""
    try:
        state, reason = dom.state()
        if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR:
            dom.resume()
            log.warning("resumed %s, paused by an I/O error during its backup", dom.name())
    except libvirt.libvirtError as exc:
        log.error("could not resume %s after its backup: %s", dom.name(), error_text(exc))


def _ended_why(dom: Domain) -> str | None:
    """None while a backup job runs; else what libvirt says of how the last one ended."""
    if _job_active(dom):
        return None
    stats = _job_stats(dom, libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    return str(stats.get("errmsg") or "no reason given by libvirt")


def _rollback_checkpoint(dom: Domain, checkpoint: str) -> None:
    """A failed backup must not advance the chain: drop the checkpoint libvirt created.

    On a shut-off domain (QEMU died mid-job) only the metadata can go (docs/libvirt.md,
    pitfall 14)."""
    try:
        if delete_on_domain(dom, checkpoint):
            log.info("removed checkpoint %s of failed backup", checkpoint)
    except VirtError as exc:
        try:
            delete_on_domain(dom, checkpoint, metadata_only=True)
        except VirtError:
            log.error("could not remove checkpoint %s of a failed backup: %s", checkpoint, exc)


def abort_job(uri: str, domain: str) -> bool:
    """Abort the domain's running backup job, if any, and wait for it to stop. True if one was
    aborted. Other jobs (a migration the platform started) are left alone.

    For a worker restarting after it was killed mid-backup.
    """
    with open_domain(uri, domain) as dom:
        stats = _settled_stats(dom)
        if int(stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE)) == libvirt.VIR_DOMAIN_JOB_NONE:
            return False
        operation = stats.get("operation", libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP)
        if operation != libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP:
            return False
        _abort(dom)
        return True


def _settled_stats(dom: Domain) -> dict[str, Any]:
    """The job's statistics once libvirt can give them. While a backup job is being set up
    (its client may have died inside ``backupBegin``) libvirt answers "backup job data
    missing"; touching the domain's checkpoints then crashed libvirtd 9.0 here (a segfault),
    so this waits, up to ``SETTLE_WAIT``, for the job to settle."""
    deadline = time.monotonic() + SETTLE_WAIT
    while True:
        try:
            return _job_stats(dom)
        except VirtError as exc:
            if "job data missing" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.05)
