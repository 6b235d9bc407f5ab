"""truthful_schedules: next_check_at drives the tick, next_run_at is the next run that takes a
backup; last_error_resolved_at

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-08 02:00:00

The tick used `next_run_at` (every local day at the hour) to find due policies; it now uses
`next_check_at`, which takes that meaning, and `next_run_at` becomes the next run that takes a
backup (set by the next tick; until then it keeps its old value, a lower bound).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0014'
down_revision: str | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "backup_policies", sa.Column("next_check_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "backup_policies",
        sa.Column("last_error_resolved_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.execute("UPDATE backup_policies SET next_check_at = next_run_at")
    op.drop_index(
        "ix_backup_policies_due",
        table_name="backup_policies",
        postgresql_where="status <> 'paused'",
    )
    op.create_index(
        "ix_backup_policies_due",
        "backup_policies",
        ["next_check_at"],
        unique=False,
        postgresql_where="status <> 'paused'",
    )


def downgrade() -> None:
    op.drop_index(
        "ix_backup_policies_due",
        table_name="backup_policies",
        postgresql_where="status <> 'paused'",
    )
    op.execute("UPDATE backup_policies SET next_run_at = next_check_at")
    op.create_index(
        "ix_backup_policies_due",
        "backup_policies",
        ["next_run_at"],
        unique=False,
        postgresql_where="status <> 'paused'",
    )
    op.drop_column("backup_policies", "last_error_resolved_at")
    op.drop_column("backup_policies", "next_check_at")
