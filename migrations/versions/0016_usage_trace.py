"""usage_records.trace_id: the trace of the request a record bills, when it was traced

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("usage_records", sa.Column("trace_id", sa.String(32)))


def downgrade() -> None:
    op.drop_column("usage_records", "trace_id")
