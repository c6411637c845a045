"""Webhook deliveries are claimed with a lease: `lease` (the token of the attempt that holds the row;
only that attempt may record its outcome) and `last_attempt_at` (when the latest attempt started).

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
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.add_column(sa.Column("lease", sa.String(32), nullable=True))
        batch.add_column(sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_column("last_attempt_at")
        batch.drop_column("lease")
