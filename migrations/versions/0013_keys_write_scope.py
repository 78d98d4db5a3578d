"""The `keys:write` scope: making and revoking a tenant's keys (the dashboard's keys page) is a
scope of its own, no longer open to any key that can sign in. Keys that held every scope there
was (`inference` and `usage:read`) could manage keys before and keep doing so; a key that was
limited (`usage:read` only, say) gets nothing more.

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "UPDATE api_keys SET scopes = array_append(scopes, 'keys:write') "
        "WHERE scopes @> ARRAY['inference', 'usage:read']::text[] "
        "AND NOT scopes @> ARRAY['keys:write']::text[]"
    )


def downgrade() -> None:
    op.execute("UPDATE api_keys SET scopes = array_remove(scopes, 'keys:write')")
