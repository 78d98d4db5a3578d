"""tenants.stripe_subscription_id and the tier that subscription carries

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("stripe_subscription_id", sa.String(255)))
    op.add_column("tenants", sa.Column("stripe_subscription_tier", sa.String(32)))
    op.create_unique_constraint(
        "uq_tenants_stripe_subscription_id", "tenants", ["stripe_subscription_id"]
    )


def downgrade() -> None:
    op.drop_constraint("uq_tenants_stripe_subscription_id", "tenants", type_="unique")
    op.drop_column("tenants", "stripe_subscription_tier")
    op.drop_column("tenants", "stripe_subscription_id")
