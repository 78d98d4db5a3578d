"""tenants.stripe_customer_id

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("stripe_customer_id", sa.String(255)))
    op.create_unique_constraint("uq_tenants_stripe_customer_id", "tenants", ["stripe_customer_id"])


def downgrade() -> None:
    op.drop_constraint("uq_tenants_stripe_customer_id", "tenants", type_="unique")
    op.drop_column("tenants", "stripe_customer_id")
