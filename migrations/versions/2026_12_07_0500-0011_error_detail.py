"""error_detail: the operator's words of a failure, beside the owner's

Revision ID: 0011
Revises: 0009
Create Date: 2026-12-07 05:00:00

`error` (and `verify_error`) keep what the owner of a backup or restore reads, without the
infrastructure; `*_detail` what an admin reads when it says more. Rows written before keep their
text in `error`, as it was.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0011'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("backups", sa.Column("error_detail", sa.Text(), nullable=True))
    op.add_column("backups", sa.Column("verify_error_detail", sa.Text(), nullable=True))
    op.add_column("restores", sa.Column("error_detail", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("restores", "error_detail")
    op.drop_column("backups", "verify_error_detail")
    op.drop_column("backups", "error_detail")
