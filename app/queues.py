"""Names of the arq queues: one control queue, one queue per hypervisor."""

from __future__ import annotations

import uuid

CONTROL_QUEUE = "ibp:control"


def hypervisor_queue(hypervisor_id: uuid.UUID | str) -> str:
    return f"ibp:hypervisor:{hypervisor_id}"
