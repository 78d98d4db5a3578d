"""Stripe's meter error reports: the reports its event destinations deliver (thin events,
fetched in full by the relay), and on each outbox row Stripe reported, what it said.

Stripe takes a meter event (2xx) before it validates it; one it then cannot use (an unknown
customer, say) is not counted, and is reported later, in a `v1.billing.meter.error_report_
triggered` event that names sample events by identifier.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stripe_meter_error_reports",
        sa.Column("id", sa.Text, primary_key=True),  # Stripe's event id
        sa.Column("type", sa.Text, nullable=False),
        sa.Column(
            "received_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("fetched_at", sa.DateTime(timezone=True)),
        sa.Column("error_count", sa.Integer),
        sa.Column("summary", sa.Text),
    )
    op.create_index(
        "stripe_meter_error_reports_unfetched",
        "stripe_meter_error_reports",
        ["received_at"],
        postgresql_where=sa.text("fetched_at IS NULL"),
    )
    op.add_column("billing_outbox", sa.Column("stripe_error", sa.Text))
    op.add_column("billing_outbox", sa.Column("stripe_error_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("billing_outbox", "stripe_error_at")
    op.drop_column("billing_outbox", "stripe_error")
    op.drop_index("stripe_meter_error_reports_unfetched", "stripe_meter_error_reports")
    op.drop_table("stripe_meter_error_reports")
