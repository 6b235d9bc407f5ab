"""backup_storages.status may be 'checking' while a check job runs on a hypervisor's worker

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 12:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint(op.f('ck_backup_storages_status'), 'backup_storages', type_='check')
    op.create_check_constraint(
        op.f('ck_backup_storages_status'),
        'backup_storages',
        "status IN ('unknown', 'checking', 'ok', 'error')",
    )


def downgrade() -> None:
    op.execute("UPDATE backup_storages SET status = 'unknown' WHERE status = 'checking'")
    op.drop_constraint(op.f('ck_backup_storages_status'), 'backup_storages', type_='check')
    op.create_check_constraint(
        op.f('ck_backup_storages_status'),
        'backup_storages',
        "status IN ('unknown', 'ok', 'error')",
    )
