"""schedules_and_protection: next_check_at drives the tick, next_run_at is the next run that
takes a backup; last_error_resolved_at; instances' protection (recovery-point objective) and
its changes

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-08 02:00:00

The tick used `next_run_at` (every local day at the hour) to find due policies; it now uses
`next_check_at`, which takes that meaning, and `next_run_at` becomes the next run that takes a
backup (set by the next tick; until then it keeps its old value, a lower bound).
Instances' protection is NULL until the first tick evaluates it (each instance then records
one change, from NULL).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0014'
down_revision: str | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


PROTECTION = "'protected', 'at_risk', 'unprotected'"


def upgrade() -> None:
    op.add_column(
        "instances", sa.Column("last_good_backup_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("instances", sa.Column("protection", sa.String(length=16), nullable=True))
    op.add_column(
        "instances", sa.Column("protection_since", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_check_constraint(
        op.f("ck_instances_protection"),
        "instances",
        f"protection IS NULL OR protection IN ({PROTECTION})",
    )
    op.create_index(
        "ix_instances_protection",
        "instances",
        ["protection"],
        unique=False,
        postgresql_where="protection IS NOT NULL",
    )
    op.create_index(
        "ix_backups_instance_completed",
        "backups",
        ["instance_id", "completed_at"],
        unique=False,
        postgresql_where="status = 'completed'",
    )
    op.create_table(
        "protection_changes",
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("policy_id", sa.Uuid(), nullable=True),
        sa.Column("from_state", sa.String(length=16), nullable=True),
        sa.Column("to_state", sa.String(length=16), nullable=True),
        sa.Column("last_good_backup_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.CheckConstraint(
            f"from_state IS NULL OR from_state IN ({PROTECTION})",
            name=op.f("ck_protection_changes_from_state"),
        ),
        sa.CheckConstraint(
            f"to_state IS NULL OR to_state IN ({PROTECTION})",
            name=op.f("ck_protection_changes_to_state"),
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_protection_changes_instance_id_instances"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["policy_id"],
            ["backup_policies.id"],
            name=op.f("fk_protection_changes_policy_id_backup_policies"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_protection_changes")),
    )
    op.create_index(
        "ix_protection_changes_instance_changed",
        "protection_changes",
        ["instance_id", "changed_at"],
        unique=False,
    )
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
    op.drop_index("ix_protection_changes_instance_changed", table_name="protection_changes")
    op.drop_table("protection_changes")
    op.drop_index(
        "ix_backups_instance_completed",
        table_name="backups",
        postgresql_where="status = 'completed'",
    )
    op.drop_index(
        "ix_instances_protection",
        table_name="instances",
        postgresql_where="protection IS NOT NULL",
    )
    op.drop_constraint(op.f("ck_instances_protection"), "instances", type_="check")
    op.drop_column("instances", "protection_since")
    op.drop_column("instances", "protection")
    op.drop_column("instances", "last_good_backup_at")
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
