"""billing_outbox.batch_id: rows aggregated into one meter event

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("billing_outbox", sa.Column("batch_id", sa.Uuid()))
    op.create_index("ix_billing_outbox_batch_id", "billing_outbox", ["batch_id"])


def downgrade() -> None:
    op.drop_index("ix_billing_outbox_batch_id", table_name="billing_outbox")
    op.drop_column("billing_outbox", "batch_id")
