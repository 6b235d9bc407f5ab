"""Errors raised by the hypervisor side. Messages are meant to be shown to an operator."""

from __future__ import annotations


class VirtError(Exception):
    """A hypervisor operation failed; ``str(err)`` explains it in words."""


class DomainNotFound(VirtError):
    """The libvirt domain does not exist on this hypervisor."""


class DomainNotRunning(VirtError):
    """The domain exists but is not running (shut off, paused, crashed, ...)."""

    def __init__(self, state: str) -> None:
        super().__init__(f"Instance is not running (libvirt state: {state})")
        self.state = state


class DomainStopped(VirtError):
    """The domain's QEMU process ended (killed, crashed, shut down) while a backup job ran."""

    def __init__(self, state: str) -> None:
        super().__init__(
            f"The VM's QEMU process stopped during the backup (libvirt state: {state})"
        )
        self.state = state


class DiskBusy(VirtError):
    """Another block job (or backup job) holds one of the disks."""

    def __init__(self, target: str) -> None:
        super().__init__(f"Disk {target} is busy with another block job")
        self.target = target


class CheckpointBroken(VirtError):
    """The parent checkpoint of an incremental is missing or its bitmap is unusable.

    The caller should take a full backup instead and record ``str(err)`` as the reason.
    """


class ScratchFull(VirtError):
    """The scratch folder has too little room for a backup's copy-before-write data: found
    before the start, or while the guest wrote during it (the job was then stopped before the
    guest's writes could fail)."""

    def __init__(self, message: str, free: int, reserve: int) -> None:
        super().__init__(message)
        self.free, self.reserve = free, reserve
