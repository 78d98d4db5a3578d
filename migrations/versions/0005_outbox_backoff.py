"""billing_outbox.retry_after: failed rows wait before their next attempt

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("billing_outbox", sa.Column("retry_after", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("billing_outbox", "retry_after")
