"""Stripe's events applied once, in their own order per subscription: the ids of the webhook
events applied (a replay is acknowledged and changes nothing), and each subscription's last
applied state with the time of the event that set it (an older event about it is stale).

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stripe_events_applied",
        sa.Column("id", sa.Text, primary_key=True),  # Stripe's event id
        sa.Column("type", sa.Text, nullable=False),
        sa.Column(
            "received_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
    )
    op.create_index("stripe_events_applied_received", "stripe_events_applied", ["received_at"])
    op.create_table(
        "stripe_subscriptions",
        sa.Column("id", sa.Text, primary_key=True),  # Stripe's subscription id
        sa.Column(
            "tenant_id", sa.Uuid, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("tier", sa.String(32), nullable=False),
        sa.Column("event_created", sa.BigInteger, nullable=False),  # unix seconds
    )


def downgrade() -> None:
    op.drop_table("stripe_subscriptions")
    op.drop_index("stripe_events_applied_received", "stripe_events_applied")
    op.drop_table("stripe_events_applied")
