"""Nullable JSON columns hold SQL NULL for "none": rows written before stored the JSON text 'null'
(so `webhook IS NOT NULL` matched jobs without a webhook); convert them.

Revision ID: 0005
Revises: 0004
"""
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

NULLABLE_JSON_COLUMNS = ("webhook", "metadata", "metrics")


def upgrade() -> None:
    for column in NULLABLE_JSON_COLUMNS:
        # CAST(... AS TEXT) reads a JSON value's text on PostgreSQL and SQLite alike.
        op.execute(f"UPDATE jobs SET {column} = NULL WHERE {column} IS NOT NULL AND CAST({column} AS TEXT) = 'null'")


def downgrade() -> None:
    pass  # SQL NULL is what the older code meant by JSON null as well
