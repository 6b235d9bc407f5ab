"""workers: live worker processes, the worker of each running job, missing backup files

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("hypervisor_id", sa.Uuid(), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["hypervisor_id"],
            ["hypervisors.id"],
            name=op.f("fk_workers_hypervisor_id_hypervisors"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    op.create_index(op.f("ix_workers_hypervisor_id"), "workers", ["hypervisor_id"])
    op.add_column("backups", sa.Column("worker_id", sa.Uuid(), nullable=True))
    op.add_column(
        "backups", sa.Column("files_missing_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("restores", sa.Column("worker_id", sa.Uuid(), nullable=True))


def downgrade() -> None:
    op.drop_column("restores", "worker_id")
    op.drop_column("backups", "files_missing_at")
    op.drop_column("backups", "worker_id")
    op.drop_index(op.f("ix_workers_hypervisor_id"), table_name="workers")
    op.drop_table("workers")
