"""usage_totals: each tenant's GPU-seconds per calendar month (UTC), kept by the database

The admission check (`billing.usage.admission_view`) summed the tenant's records of the month
on every read, a cost that grew with the tenant's traffic. A statement-level trigger on
usage_records adds each statement's new records to their (tenant, month) row in the same
transaction, so the total is always exactly the records': whatever writes them, a record
counted once. The ledger is append-only, but an update or delete (a correction by hand, a
test moving a record to last month) is followed too.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# One function for the three triggers (PostgreSQL gives transition tables to single-event
# triggers only): what a statement removed comes off its (tenant, month) rows, what it added
# goes on, so a correction made by hand keeps the totals true as well.
KEEP = """
CREATE FUNCTION usage_totals_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO usage_totals (tenant_id, period_start, gpu_seconds, records)
        SELECT tenant_id, date_trunc('month', finished_at, 'UTC'), -sum(gpu_seconds), -count(*)
        FROM old_rows
        GROUP BY 1, 2
        ORDER BY 1, 2
        ON CONFLICT (tenant_id, period_start) DO UPDATE
            SET gpu_seconds = usage_totals.gpu_seconds + excluded.gpu_seconds,
                records = usage_totals.records + excluded.records;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO usage_totals (tenant_id, period_start, gpu_seconds, records)
        SELECT tenant_id, date_trunc('month', finished_at, 'UTC'), sum(gpu_seconds), count(*)
        FROM new_rows
        GROUP BY 1, 2
        -- every writer locks the rows it adds to in one order: no deadlock between writers
        ORDER BY 1, 2
        ON CONFLICT (tenant_id, period_start) DO UPDATE
            SET gpu_seconds = usage_totals.gpu_seconds + excluded.gpu_seconds,
                records = usage_totals.records + excluded.records;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER usage_totals_insert AFTER INSERT ON usage_records
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION usage_totals_keep();
CREATE TRIGGER usage_totals_update AFTER UPDATE ON usage_records
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION usage_totals_keep();
CREATE TRIGGER usage_totals_delete AFTER DELETE ON usage_records
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION usage_totals_keep();
"""


def upgrade() -> None:
    op.create_table(
        "usage_totals",
        sa.Column(
            "tenant_id",
            sa.Uuid(),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("period_start", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("gpu_seconds", sa.Double(), nullable=False),
        sa.Column("records", sa.Integer(), nullable=False),
    )
    # No record may land between the backfill and the trigger: hold writers off until commit.
    op.execute("LOCK TABLE usage_records IN SHARE ROW EXCLUSIVE MODE")
    op.execute(KEEP)
    op.execute(
        """
        INSERT INTO usage_totals (tenant_id, period_start, gpu_seconds, records)
        SELECT tenant_id, date_trunc('month', finished_at, 'UTC'), sum(gpu_seconds), count(*)
        FROM usage_records
        GROUP BY 1, 2
        """
    )


def downgrade() -> None:
    for event in ("insert", "update", "delete"):
        op.execute(f"DROP TRIGGER usage_totals_{event} ON usage_records")
    op.execute("DROP FUNCTION usage_totals_keep()")
    op.drop_table("usage_totals")
