"""A failed (or cancelled) job's stable `error_code` beside its message.

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
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("error_code", sa.String(64), nullable=True))
    # Jobs that ended before codes existed: the reason is in `error`; a worker loss or a cancel is recognisable.
    op.execute("UPDATE jobs SET error_code = 'cancelled' WHERE status = 'cancelled' AND error IS NOT NULL")
    op.execute("UPDATE jobs SET error_code = 'worker_lost' WHERE status = 'failed' AND error LIKE '%stopped answering%'")
    op.execute("UPDATE jobs SET error_code = 'unknown' WHERE status = 'failed' AND error_code IS NULL")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("error_code")
