"""policy change notifications: an edit that leaves an owner's list as it was says which policy

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 00:00:00

Until now every policy change sent `o:<owner id>`, which retires all of that owner's cached
pages and every admin page. Most changes only alter what one listed policy shows (an edit, the
tick advancing `next_run_at`, an instance attached or detached): those now send
`p:<policy id>`, which retires only the pages showing that policy (see app/cache.py). A change
that may move a policy in or out of a page (created, deleted, another owner, another status,
another `created_at`, the list's order) still sends `o:`.
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


UPGRADE = [
    r"""
CREATE OR REPLACE FUNCTION ibp_notify_policy() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.id = NEW.id AND OLD.owner_id = NEW.owner_id
            AND OLD.status = NEW.status AND OLD.created_at = NEW.created_at THEN
        PERFORM pg_notify('ibp_changes', 'p:' || NEW.id);
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_notify('ibp_changes', 'o:' || OLD.owner_id);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM pg_notify('ibp_changes', 'o:' || NEW.owner_id);
    END IF;
    RETURN NULL;
END $$;
""",
    r"""
CREATE OR REPLACE FUNCTION ibp_notify_attachment() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.backup_policy_id IS NOT DISTINCT FROM NEW.backup_policy_id THEN
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' AND OLD.backup_policy_id IS NOT NULL THEN
        PERFORM pg_notify('ibp_changes', 'p:' || OLD.backup_policy_id);
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.backup_policy_id IS NOT NULL THEN
        PERFORM pg_notify('ibp_changes', 'p:' || NEW.backup_policy_id);
    END IF;
    RETURN NULL;
END $$;
""",
]

# As migration 0004 made them.
DOWNGRADE = [
    r"""
CREATE OR REPLACE FUNCTION ibp_notify_policy() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_notify('ibp_changes', 'o:' || OLD.owner_id);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM pg_notify('ibp_changes', 'o:' || NEW.owner_id);
    END IF;
    RETURN NULL;
END $$;
""",
    r"""
CREATE OR REPLACE FUNCTION ibp_notify_attachment() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.backup_policy_id IS NOT DISTINCT FROM NEW.backup_policy_id THEN
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' AND OLD.backup_policy_id IS NOT NULL THEN
        PERFORM pg_notify('ibp_changes', 'o:' || p.owner_id)
        FROM backup_policies p WHERE p.id = OLD.backup_policy_id;
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.backup_policy_id IS NOT NULL THEN
        PERFORM pg_notify('ibp_changes', 'o:' || p.owner_id)
        FROM backup_policies p WHERE p.id = NEW.backup_policy_id;
    END IF;
    RETURN NULL;
END $$;
""",
]


def upgrade() -> None:
    for statement in UPGRADE:  # one per execute: asyncpg prepares each
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
