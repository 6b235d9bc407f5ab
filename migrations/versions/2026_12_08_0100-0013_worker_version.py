"""worker_version: the package version each worker process runs, for `ibp status`

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08 01:00:00

Rows of workers started before keep no version (NULL).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("workers", sa.Column("version", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("workers", "version")
