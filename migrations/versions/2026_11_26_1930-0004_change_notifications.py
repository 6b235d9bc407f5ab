"""change notifications: triggers NOTIFY what the API's read caches hold

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 19:30:00

A policy-list page depends on policies, on which instances are attached to them, and on the
owner's timezone; a cached token on the token row and its user's role. Each change NOTIFYs
channel `ibp_changes` at commit: `o:<owner id>` for an owner's policy list, `t` for tokens
(see app/cache.py). Triggers, not application code, so every writer is covered: the API, the
worker, the CLI, and hand-written SQL.
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


UPGRADE = [
    r"""
CREATE FUNCTION ibp_notify_policy() RETURNS trigger LANGUAGE plpgsql AS $$
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
CREATE TRIGGER backup_policies_notify AFTER INSERT OR UPDATE OR DELETE ON backup_policies
    FOR EACH ROW EXECUTE FUNCTION ibp_notify_policy();
""",
    r"""
CREATE FUNCTION ibp_notify_attachment() RETURNS trigger LANGUAGE plpgsql AS $$
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
    r"""
CREATE TRIGGER instances_notify AFTER INSERT OR DELETE OR UPDATE OF backup_policy_id
    ON instances FOR EACH ROW EXECUTE FUNCTION ibp_notify_attachment();
""",
    r"""
CREATE FUNCTION ibp_notify_user() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR OLD.role IS DISTINCT FROM NEW.role THEN
        PERFORM pg_notify('ibp_changes', 't');
    END IF;
    IF TG_OP = 'DELETE' OR OLD.timezone IS DISTINCT FROM NEW.timezone THEN
        PERFORM pg_notify('ibp_changes', 'o:' || OLD.id);
    END IF;
    RETURN NULL;
END $$;
""",
    r"""
CREATE TRIGGER users_notify AFTER DELETE OR UPDATE OF role, timezone ON users
    FOR EACH ROW EXECUTE FUNCTION ibp_notify_user();
""",
    r"""
CREATE FUNCTION ibp_notify_token() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ibp_changes', 't');
    RETURN NULL;
END $$;
""",
    r"""
CREATE TRIGGER api_tokens_notify
    AFTER DELETE OR UPDATE OF revoked_at, expires_at, token_hash, user_id ON api_tokens
    FOR EACH ROW EXECUTE FUNCTION ibp_notify_token();
""",
]

DOWNGRADE = [
    "DROP TRIGGER api_tokens_notify ON api_tokens",
    "DROP FUNCTION ibp_notify_token()",
    "DROP TRIGGER users_notify ON users",
    "DROP FUNCTION ibp_notify_user()",
    "DROP TRIGGER instances_notify ON instances",
    "DROP FUNCTION ibp_notify_attachment()",
    "DROP TRIGGER backup_policies_notify ON backup_policies",
    "DROP FUNCTION ibp_notify_policy()",
]


def upgrade() -> None:
    for statement in UPGRADE:  # one per execute: asyncpg prepares each
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
