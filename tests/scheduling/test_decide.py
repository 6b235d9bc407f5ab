"""When the backup job's last check turns a planned incremental into a full, and the reason
it records."""

from __future__ import annotations

import uuid

import pytest

from app.scheduling import STORAGE_CHANGED, Chain, ChainState, Decision, decide

CHAIN = uuid.uuid4()
STORAGE = uuid.uuid4()
TIP = uuid.uuid4()
VDA = ("vda", 64 << 20)
VDB = ("vdb", 32 << 20)
Disk = tuple[str, int]


def _chain(**overrides: object) -> Chain:
    values: dict[str, object] = {
        "state": ChainState(2, True),
        "chain_id": CHAIN,
        "tip_id": TIP,
        "tip_checkpoint": f"ibp-{TIP}",
        "backup_device": "all",
        "storage_id": STORAGE,
        "disks": [
            {"target": "vda", "size_bytes": 64 << 20},
            {"target": "vdb", "size_bytes": 32 << 20},
        ],
        "busy": False,
    }
    values.update(overrides)
    return Chain(**values)  # type: ignore[arg-type]


NEW_CHAIN = uuid.uuid4()


def _decide(
    chain: Chain,
    disks: list[Disk],
    checkpoints: list[str],
    planned: str = "incremental",
    storage: uuid.UUID = STORAGE,
) -> Decision:
    planned_reason = "previous full backup failed" if planned == "full" else None
    return decide(
        planned, planned_reason, chain, "all", storage, dict(disks), checkpoints, NEW_CHAIN
    )


def test_incremental_builds_on_the_chain_tip() -> None:
    d = _decide(_chain(), [VDA, VDB], [f"ibp-{TIP}"])
    assert (d.type, d.parent_id, d.chain_id, d.incremental_from, d.reset_reason) == (
        "incremental",
        TIP,
        CHAIN,
        f"ibp-{TIP}",
        None,
    )


@pytest.mark.parametrize(
    ("chain", "disks", "checkpoints", "reason"),
    [
        (_chain(state=None, chain_id=None, tip_id=None), [VDA, VDB], [], "no completed full"),
        (
            _chain(state=ChainState(0, False, "previous full backup failed")),
            [VDA, VDB],
            [],
            "previous full backup failed",
        ),
        (
            _chain(backup_device="primary"),
            [VDA, VDB],
            [f"ibp-{TIP}"],
            "backup device setting changed",
        ),
        (
            _chain(),
            [VDA, VDB, ("vdc", 1 << 20)],
            [f"ibp-{TIP}"],
            "disk vdc was added",
        ),
        (_chain(), [VDA], [f"ibp-{TIP}"], "disk vdb was removed"),
        (
            _chain(),
            [VDA, ("vdb", 48 << 20)],
            [f"ibp-{TIP}"],
            "disk vdb was resized from 33554432 to 50331648 bytes",
        ),
        (_chain(), [VDA, VDB], [], f"checkpoint ibp-{TIP} is missing"),
    ],
)
def test_a_broken_base_turns_the_incremental_into_a_full_with_the_reason(
    chain: Chain, disks: list[Disk], checkpoints: list[str], reason: str
) -> None:
    d = _decide(chain, disks, checkpoints)
    assert d.type == "full" and d.parent_id is None and d.incremental_from is None
    assert d.chain_id == NEW_CHAIN
    assert d.reset_reason is not None and d.reset_reason.startswith(reason)


def test_a_planned_full_keeps_its_planned_reason() -> None:
    d = _decide(_chain(), [VDA, VDB], [f"ibp-{TIP}"], planned="full")
    assert d.type == "full" and d.reset_reason == "previous full backup failed"


def test_a_chain_on_another_storage_takes_no_incremental() -> None:
    """Its parent would stay on the old storage, where a restore from the new one cannot reach."""
    d = _decide(_chain(), [VDA, VDB], [f"ibp-{TIP}"], storage=uuid.uuid4())
    assert (d.type, d.parent_id, d.chain_id) == ("full", None, NEW_CHAIN)
    assert d.reset_reason == STORAGE_CHANGED
