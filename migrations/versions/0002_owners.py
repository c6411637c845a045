"""Owners with several keys; key prefixes; idempotency per owner with the request's hash;
per-attempt artifact folders; 64-bit artifact sizes.

Each existing key's name becomes an owner holding that key, and the key's jobs become the owner's.
Keys made before this revision have no prefix (only their hash was ever stored).

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "owners",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.execute("INSERT INTO owners (name, created_at) SELECT name, created_at FROM api_keys")

    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("owner_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("prefix", sa.String(12), nullable=True))
    op.execute("UPDATE api_keys SET owner_id = (SELECT owners.id FROM owners WHERE owners.name = api_keys.name)")
    with op.batch_alter_table("api_keys") as batch:
        batch.alter_column("owner_id", existing_type=sa.Integer(), nullable=False)
        batch.create_foreign_key("fk_api_keys_owner", "owners", ["owner_id"], ["id"])
        batch.create_index("ix_api_keys_owner_id", ["owner_id"])
        batch.create_unique_constraint("uq_api_keys_prefix", ["prefix"])
        batch.drop_column("name")

    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("owner_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("request_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("published_run", sa.String(64), nullable=True))
    op.execute("UPDATE jobs SET owner_id = (SELECT api_keys.owner_id FROM api_keys WHERE api_keys.id = jobs.key_id)")
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("owner_id", existing_type=sa.Integer(), nullable=False)
        batch.alter_column("key_id", existing_type=sa.Integer(), nullable=True)
        batch.create_foreign_key("fk_jobs_owner", "owners", ["owner_id"], ["id"])
        batch.create_index("ix_jobs_owner_id", ["owner_id"])
        batch.drop_constraint("uq_jobs_key_idempotency", type_="unique")
        batch.create_unique_constraint("uq_jobs_owner_idempotency", ["owner_id", "idempotency_key"])

    with op.batch_alter_table("artifacts") as batch:
        batch.alter_column("size", existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.alter_column("size", existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=False)

    # A job goes back to its submitting key, or to its owner's first key.
    op.execute("UPDATE jobs SET key_id = (SELECT MIN(api_keys.id) FROM api_keys WHERE api_keys.owner_id = jobs.owner_id) "
               "WHERE key_id IS NULL")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("uq_jobs_owner_idempotency", type_="unique")
        batch.create_unique_constraint("uq_jobs_key_idempotency", ["key_id", "idempotency_key"])
        batch.drop_index("ix_jobs_owner_id")
        batch.drop_constraint("fk_jobs_owner", type_="foreignkey")
        batch.alter_column("key_id", existing_type=sa.Integer(), nullable=False)
        batch.drop_column("published_run")
        batch.drop_column("request_sha256")
        batch.drop_column("owner_id")

    # Key names must be unique again: an owner's first key takes the owner's name, others NAME#ID.
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("name", sa.String(100), nullable=True))
    op.execute("UPDATE api_keys SET name = (SELECT owners.name FROM owners WHERE owners.id = api_keys.owner_id) "
               "|| CASE WHEN api_keys.id = (SELECT MIN(k.id) FROM api_keys k WHERE k.owner_id = api_keys.owner_id) "
               "THEN '' ELSE '#' || CAST(api_keys.id AS VARCHAR(20)) END")
    with op.batch_alter_table("api_keys") as batch:
        batch.alter_column("name", existing_type=sa.String(100), nullable=False)
        batch.create_unique_constraint("uq_api_keys_name", ["name"])
        batch.drop_constraint("uq_api_keys_prefix", type_="unique")
        batch.drop_index("ix_api_keys_owner_id")
        batch.drop_constraint("fk_api_keys_owner", type_="foreignkey")
        batch.drop_column("prefix")
        batch.drop_column("owner_id")
    op.drop_table("owners")
