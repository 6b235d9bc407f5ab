"""drop change notifications: the read cache they fed is gone

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 00:00:00

Every notifying commit took PostgreSQL's global notify lock for a cache that no longer exists.
The downgrade rebuilds the triggers and functions as 0004 and 0005 left them, from their SQL.
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _revision(number: str) -> ModuleType:
    path = next(Path(__file__).parent.glob(f"*-{number}_*.py"))
    spec = importlib.util.spec_from_file_location(f"ibp_revision_{number}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    for statement in _revision("0004").DOWNGRADE:  # the triggers, then their functions
        op.execute(statement)


def downgrade() -> None:
    for statement in _revision("0004").UPGRADE + _revision("0005").UPGRADE:
        op.execute(statement)
