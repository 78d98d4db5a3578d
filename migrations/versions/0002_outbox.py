"""billing outbox; index for usage by tenant and time

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "billing_outbox",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column(
            "usage_record_id",
            sa.Uuid(),
            sa.ForeignKey(
                "usage_records.id",
                ondelete="RESTRICT",
                name="fk_billing_outbox_usage_record_id_usage_records",
            ),
            nullable=False,
        ),
        sa.Column(
            "tenant_id",
            sa.Uuid(),
            sa.ForeignKey(
                "tenants.id", ondelete="RESTRICT", name="fk_billing_outbox_tenant_id_tenants"
            ),
            nullable=False,
        ),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("event_time", TZ, nullable=False),
        sa.Column("created_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.Column("sent_at", TZ),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text()),
        sa.UniqueConstraint("usage_record_id", name="uq_billing_outbox_usage_record_id"),
    )
    op.create_index(
        "ix_billing_outbox_unsent",
        "billing_outbox",
        ["created_at"],
        postgresql_where=sa.text("sent_at IS NULL"),
    )
    op.create_index(
        "ix_usage_records_tenant_finished", "usage_records", ["tenant_id", "finished_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_usage_records_tenant_finished", table_name="usage_records")
    op.drop_table("billing_outbox")
