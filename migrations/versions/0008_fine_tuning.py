"""fine_tunes, fine_tune_segments, adapters: LoRA fine-tuning of Stable Diffusion

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def _now() -> sa.Column:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
    )


def upgrade() -> None:
    op.create_table(
        "fine_tunes",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "tenant_id",
            sa.Uuid(),
            sa.ForeignKey("tenants.id", ondelete="RESTRICT"),
            nullable=False,
            index=True,
        ),
        sa.Column("api_key_id", sa.Uuid(), sa.ForeignKey("api_keys.id", ondelete="SET NULL")),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("params", postgresql.JSONB(), nullable=False),
        sa.Column("dataset_key", sa.Text(), nullable=False),
        sa.Column("dataset_images", sa.Integer(), nullable=False),
        sa.Column("dataset_bytes", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Double()),
        sa.Column("checkpoint_step", sa.Integer(), nullable=False),
        sa.Column("checkpoint_key", sa.Text()),
        sa.Column("gpu_seconds", sa.Double(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(200)),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True)),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("adapter_id", sa.String(64)),
        sa.Column("error", sa.Text()),
        _now(),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_fine_tunes_status", "fine_tunes", ["status"])
    op.create_table(
        "fine_tune_segments",
        sa.Column(
            "fine_tune_id",
            sa.String(64),
            sa.ForeignKey("fine_tunes.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("from_step", sa.Integer(), primary_key=True),
        sa.Column("to_step", sa.Integer(), nullable=False),
        sa.Column("gpu_seconds", sa.Double(), nullable=False),
        sa.Column("loss", sa.Double(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
    )
    op.create_table(
        "adapters",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "tenant_id",
            sa.Uuid(),
            sa.ForeignKey("tenants.id", ondelete="RESTRICT"),
            nullable=False,
            index=True,
        ),
        sa.Column("fine_tune_id", sa.String(64)),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        _now(),
    )


def downgrade() -> None:
    op.drop_table("adapters")
    op.drop_table("fine_tune_segments")
    op.drop_index("ix_fine_tunes_status", table_name="fine_tunes")
    op.drop_table("fine_tunes")
