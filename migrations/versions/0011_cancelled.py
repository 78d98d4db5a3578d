"""One spelling: a fine-tune stopped by its tenant is 'cancelled' (was 'canceled'), as every
other status and OpenAI's fine-tuning and batch APIs spell it.

Revision ID: 0011
Revises: 0010
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("UPDATE fine_tunes SET status = 'cancelled' WHERE status = 'canceled'")


def downgrade() -> None:
    op.execute("UPDATE fine_tunes SET status = 'canceled' WHERE status = 'cancelled'")
