"""The hypervisor side: libvirt pull-mode backups read over NBD into qcow2 streams, checkpoints,
disk discovery, qemu-img mechanics.

Every function but ``pull_backup`` (async) blocks: call it through ``asyncio.to_thread``. Each
opens its own libvirt connection, so calls from different threads do not share state.
"""

from app.virt._conn import register_error_handler
from app.virt.backup import abort_job
from app.virt.checkpoints import (
    delete_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    reset_checkpoints,
)
from app.virt.domains import DiskInfo, domain_state, list_disks
from app.virt.errors import (
    CheckpointBroken,
    DiskBusy,
    DomainNotFound,
    DomainNotRunning,
    DomainStopped,
    ScratchFull,
    VirtError,
)
from app.virt.images import check_image, image_info
from app.virt.pull import Disk, Pull, pull_backup

register_error_handler()

__all__ = [
    "CheckpointBroken",
    "Disk",
    "DiskBusy",
    "DiskInfo",
    "DomainNotFound",
    "DomainNotRunning",
    "DomainStopped",
    "Pull",
    "ScratchFull",
    "VirtError",
    "abort_job",
    "check_image",
    "delete_checkpoint",
    "domain_state",
    "image_info",
    "list_checkpoints",
    "list_disks",
    "prune_checkpoints",
    "pull_backup",
    "reset_checkpoints",
]
