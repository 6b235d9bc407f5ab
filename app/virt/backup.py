"""Push-mode backup jobs (full / incremental) through libvirt's backup API."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import libvirt

from app.virt._conn import Domain, error_code, error_text, open_domain
from app.virt.checkpoints import checkpoint_disks, checkpoint_names, delete_on_domain
from app.virt.domains import require_running, state_of, xml_disks
from app.virt.errors import BackupAborted, CheckpointBroken, DiskBusy, DomainStopped, VirtError
from app.virt.images import create_full_target, wait_unlocked
from app.writeback import written_back

log = logging.getLogger(__name__)

DEFAULT_BACKUP_TIMEOUT = 6 * 3600.0
POLL_INTERVAL = 0.1
ABORT_WAIT = 60.0
# QEMU's death reaches libvirt (the domain turns inactive) a moment after its monitor stops
# answering: how long a failing job query on a domain still called running is looked at again.
STOP_GRACE = 5.0

Progress = Callable[[int, int], None]

_BROKEN_HINTS = ("checkpoint inconsistent", "missing or broken bitmap")


@dataclass(frozen=True)
class ScratchFile:
    target: str  # "vda"
    path: Path  # qcow2 written by QEMU; an incremental's backing file is the live disk
    size_bytes: int  # size of the file on disk


def scratch_path(scratch_dir: Path, checkpoint: str, target: str) -> Path:
    return scratch_dir / f"{checkpoint}-{target}.qcow2"


def _check_name(kind: str, value: str) -> None:
    if not value or "/" in value or value.startswith(".") or any(c.isspace() for c in value):
        raise VirtError(f"Invalid {kind} name {value!r}")


def backup_xml(all_targets: list[str], files: dict[str, Path], incremental_from: str | None) -> str:
    parts = ["<domainbackup mode='push'>"]
    if incremental_from is not None:
        parts.append(f"<incremental>{_text(incremental_from)}</incremental>")
    parts.append("<disks>")
    for target in all_targets:
        if target in files:
            parts.append(
                f"<disk name={quoteattr(target)} backup='yes' type='file'>"
                f"<target file={quoteattr(str(files[target]))}/><driver type='qcow2'/></disk>"
            )
        else:
            parts.append(f"<disk name={quoteattr(target)} backup='no'/>")
    parts.append("</disks></domainbackup>")
    return "".join(parts)


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


def _capacity(dom: Domain, target: str) -> int:
    try:
        return int(dom.blockInfo(target)[0])
    except libvirt.libvirtError as exc:
        raise VirtError(f"Cannot read the size of disk {target}: {error_text(exc)}") from exc


def _remove(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError as exc:  # pragma: no cover - best effort
            log.warning("could not remove scratch file %s: %s", p, exc)


def run_backup(
    uri: str,
    domain: str,
    targets: list[str],
    scratch_dir: Path,
    checkpoint: str,
    incremental_from: str | None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    timeout: float = DEFAULT_BACKUP_TIMEOUT,
) -> list[ScratchFile]:
    """Back up ``targets`` of a running domain into ``scratch_dir`` and create ``checkpoint``.

    Full when ``incremental_from`` is None, else only the blocks changed since that checkpoint
    (then each file's backing file is the LIVE disk: ``rebase_onto`` it before storing it).
    Blocks until done; ``progress(processed, total)`` is called with bytes as the job runs.
    On any failure no scratch file is left and ``checkpoint`` does not exist afterwards.
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
    scratch_dir.mkdir(parents=True, exist_ok=True)
    files = {t: scratch_path(scratch_dir, checkpoint, t) for t in targets}
    paths = list(files.values())

    with open_domain(uri, domain) as dom:
        all_targets = _preflight(dom, targets, checkpoint, incremental_from)
        # Leftovers of a killed run: QEMU refuses an existing target (docs/libvirt.md, pitfall 6).
        _remove(paths)
        bxml = backup_xml(all_targets, files, incremental_from)
        cxml = checkpoint_xml(all_targets, targets, checkpoint)
        started = False
        run_id = _domain_id(dom)  # _preflight saw it running
        try:
            flags = 0
            if incremental_from is None:
                for t, p in files.items():
                    create_full_target(p, _capacity(dom, t))
                flags = libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL
            try:
                dom.backupBegin(bxml, cxml, flags)
            except libvirt.libvirtError as exc:
                text = error_text(exc)
                if error_code(exc) == libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT or _broken(text):
                    raise CheckpointBroken(
                        f"Checkpoint {incremental_from} cannot be used: {text}"
                    ) from exc
                raise VirtError(f"The backup of {domain} could not start: {text}") from exc
            started = True
            # When QEMU dies mid-job, libvirt speaks of the job ("domain is not running", a
            # cancelled job): the words an operator needs are about the process (docs/libvirt.md,
            # pitfall 13).
            try:
                # QEMU writes the files through the page cache and fdatasyncs them at the end of
                # the job: with their writeback started meanwhile, that last flush has less to
                # wait for.
                with written_back(paths):
                    _wait(dom, progress, cancel, timeout)
                started = False
                total = _outcome(dom, incremental_from)
            except VirtError as exc:
                stopped = _stopped(dom, run_id)
                if stopped is None:
                    raise
                started = False  # the job went with the process: nothing left to abort
                raise stopped from exc
            if total is None:
                # Someone else read (and so cleared) the completed statistics: the files are
                # whole if the process that wrote them still runs.
                stopped = _stopped(dom, run_id)
                if stopped is not None:
                    raise stopped
                log.warning("completed statistics of the backup of %s were not available", domain)
                total = 0
            for p in paths:
                wait_unlocked(p)
            scratch = [ScratchFile(t, p, p.stat().st_size) for t, p in files.items()]
            if progress is not None and total > 0:
                progress(total, total)
            return scratch
        except BaseException:
            if started:
                try:
                    _abort(dom)
                except VirtError as exc:
                    log.error("%s", exc)
            _remove(paths)
            _rollback_checkpoint(dom, checkpoint)
            raise


def _wait(
    dom: Domain, progress: Progress | None, cancel: threading.Event | None, timeout: float
) -> None:
    """Poll the job until it ends. Cancel and timeout are checked first, so a cancel that
    arrives while the job finishes still wins (the caller aborts and discards everything)."""
    start = time.monotonic()
    interval = 0.02
    while True:
        if cancel is not None and cancel.is_set():
            raise BackupAborted("The backup was cancelled")
        elapsed = time.monotonic() - start
        if elapsed >= timeout:
            raise BackupAborted(f"The backup did not finish within {timeout:g}s and was aborted")
        stats = _job_stats(dom)
        if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
            return
        if progress is not None:
            total = int(stats.get("disk_total", stats.get("data_total", 0)))
            done = int(stats.get("disk_processed", stats.get("data_processed", 0)))
            progress(done, total)
        wait = min(interval, max(0.0, timeout - (time.monotonic() - start)))
        if cancel is not None:
            cancel.wait(wait)
        else:
            time.sleep(wait)
        # Poll fast while a job is young (most finish in seconds), relax for long ones.
        interval = min(interval * 1.5, POLL_INTERVAL if elapsed < 30 else POLL_INTERVAL * 10)


def _outcome(dom: Domain, incremental_from: str | None) -> int | None:
    """Read the finished job's statistics; raise unless it succeeded. Returns the job's total
    bytes, or None when the statistics were not available."""
    stats = _job_stats(dom, libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    jtype = stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE)
    total = int(stats.get("disk_total", 0))
    log.debug("backup job of %s ended: %s", dom.name(), stats)
    if jtype == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    success = stats.get("success")
    if jtype == libvirt.VIR_DOMAIN_JOB_COMPLETED and success is not False:
        return total
    errmsg = str(stats.get("errmsg") or "")
    if jtype == libvirt.VIR_DOMAIN_JOB_CANCELLED:
        raise BackupAborted(f"The backup job was cancelled on the hypervisor {errmsg}".strip())
    if incremental_from is not None and _broken(errmsg):
        raise CheckpointBroken(f"Checkpoint {incremental_from} cannot be used: {errmsg}")
    raise VirtError(f"The backup job failed: {errmsg or 'no reason given by libvirt'}")


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
        stats = _job_stats(dom)
        if int(stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE)) == libvirt.VIR_DOMAIN_JOB_NONE:
            return False
        operation = stats.get("operation", libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP)
        if operation != libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP:
            return False
        _abort(dom)
        return True
