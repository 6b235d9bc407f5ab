"""The hypervisor side: libvirt backup jobs, checkpoints, disk discovery, qemu-img mechanics.

Every function blocks (call it through ``asyncio.to_thread``) and opens its own libvirt
connection, so calls from different threads do not share state.
"""

from app.virt._conn import register_error_handler
from app.virt.backup import (
    DEFAULT_BACKUP_TIMEOUT,
    Progress,
    ScratchFile,
    abort_job,
    run_backup,
    scratch_path,
)
from app.virt.checkpoints import (
    delete_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    reset_checkpoints,
)
from app.virt.domains import DiskInfo, domain_state, list_disks
from app.virt.errors import (
    BackupAborted,
    CheckpointBroken,
    DiskBusy,
    DomainNotFound,
    DomainNotRunning,
    DomainStopped,
    VirtError,
)
from app.virt.images import (
    check_image,
    image_info,
    rebase_onto,
)

register_error_handler()

__all__ = [
    "DEFAULT_BACKUP_TIMEOUT",
    "BackupAborted",
    "CheckpointBroken",
    "DiskBusy",
    "DiskInfo",
    "DomainNotFound",
    "DomainNotRunning",
    "DomainStopped",
    "Progress",
    "ScratchFile",
    "VirtError",
    "abort_job",
    "check_image",
    "delete_checkpoint",
    "domain_state",
    "image_info",
    "list_checkpoints",
    "list_disks",
    "prune_checkpoints",
    "rebase_onto",
    "reset_checkpoints",
    "run_backup",
    "scratch_path",
]
