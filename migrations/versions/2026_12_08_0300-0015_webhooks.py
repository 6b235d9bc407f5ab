"""webhooks: endpoints users and admins register, and each event's delivery to one

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-08 03:00:00

Signed webhooks (Standard Webhooks): an endpoint's signing secret is sealed like storage
secrets; a delivery row per event and endpoint is written with the change it reports, then
sent by the control worker with retries.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0015'
down_revision: str | None = '0014'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'webhook_endpoints',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('owner_id', sa.Uuid(), nullable=False),
        sa.Column('all_users', sa.Boolean(), nullable=False),
        sa.Column('url', sa.String(length=2000), nullable=False),
        sa.Column('description', sa.String(length=200), nullable=False),
        sa.Column('events', postgresql.ARRAY(sa.String(length=64)), nullable=False),
        sa.Column('secret_encrypted', sa.Text(), nullable=False),
        sa.Column('enabled', sa.Boolean(), nullable=False),
        sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('disabled_reason', sa.Text(), nullable=True),
        sa.Column(
            'created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False
        ),
        sa.Column(
            'updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False
        ),
        sa.CheckConstraint(
            '(disabled_at IS NULL) = enabled',
            name=op.f('ck_webhook_endpoints_disabled_when_not_enabled'),
        ),
        sa.CheckConstraint('cardinality(events) >= 1', name=op.f('ck_webhook_endpoints_events')),
        sa.ForeignKeyConstraint(
            ['owner_id'],
            ['users.id'],
            name=op.f('fk_webhook_endpoints_owner_id_users'),
            ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_endpoints')),
    )
    op.create_index(
        'ix_webhook_endpoints_owner_created', 'webhook_endpoints', ['owner_id', 'created_at', 'id']
    )
    op.create_index(
        'ix_webhook_endpoints_all_users',
        'webhook_endpoints',
        ['all_users'],
        postgresql_where='all_users',
    )
    op.create_table(
        'webhook_deliveries',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('endpoint_id', sa.Uuid(), nullable=False),
        sa.Column('event_type', sa.String(length=64), nullable=False),
        sa.Column('message_id', sa.String(length=64), nullable=False),
        sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('attempts', sa.SmallInteger(), nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_attempt_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_response_code', sa.SmallInteger(), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'succeeded', 'failed')",
            name=op.f('ck_webhook_deliveries_status'),
        ),
        sa.CheckConstraint('attempts >= 0', name=op.f('ck_webhook_deliveries_attempts')),
        sa.ForeignKeyConstraint(
            ['endpoint_id'],
            ['webhook_endpoints.id'],
            name=op.f('fk_webhook_deliveries_endpoint_id_webhook_endpoints'),
            ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries')),
    )
    op.create_index(
        'ix_webhook_deliveries_endpoint_created', 'webhook_deliveries', ['endpoint_id', 'created_at']
    )
    op.create_index(
        'ix_webhook_deliveries_due',
        'webhook_deliveries',
        ['next_attempt_at'],
        postgresql_where="status = 'pending'",
    )
    op.create_index(
        'ix_webhook_deliveries_finished',
        'webhook_deliveries',
        ['completed_at'],
        postgresql_where="status <> 'pending'",
    )


def downgrade() -> None:
    op.drop_index('ix_webhook_deliveries_finished', table_name='webhook_deliveries')
    op.drop_index('ix_webhook_deliveries_due', table_name='webhook_deliveries')
    op.drop_index('ix_webhook_deliveries_endpoint_created', table_name='webhook_deliveries')
    op.drop_table('webhook_deliveries')
    op.drop_index('ix_webhook_endpoints_all_users', table_name='webhook_endpoints')
    op.drop_index('ix_webhook_endpoints_owner_created', table_name='webhook_endpoints')
    op.drop_table('webhook_endpoints')
