"""Webhook signing secrets sealed under the server key (storage/sealing.py): the column grows to hold
a sealed value, and the secrets kept in clear until now are sealed. The key is this process's
(ERQ_SECRET_KEY, else HOME/secret-key, written when missing), as for every erq process.

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op

from storage.sealing import is_sealed, seal, unseal
from storage.settings import Settings

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

owners = sa.table("owners", sa.column("id", sa.Integer), sa.column("webhook_secret", sa.String))


def upgrade() -> None:
    with op.batch_alter_table("owners") as batch:
        batch.alter_column("webhook_secret", type_=sa.String(400), existing_type=sa.String(100),
                           existing_nullable=True)
    _rewrite(lambda value, settings: value if is_sealed(value) else seal(value, settings))


def downgrade() -> None:
    _rewrite(lambda value, settings: unseal(value, settings) if is_sealed(value) else value)
    with op.batch_alter_table("owners") as batch:
        batch.alter_column("webhook_secret", type_=sa.String(100), existing_type=sa.String(400),
                           existing_nullable=True)


def _rewrite(change) -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.select(owners.c.id, owners.c.webhook_secret)
                              .where(owners.c.webhook_secret.is_not(None))).all()
    if not rows:
        return  # no key is needed, none is made
    settings = Settings()
    for owner_id, value in rows:
        changed = change(value, settings)
        if changed != value:
            connection.execute(owners.update().where(owners.c.id == owner_id).values(webhook_secret=changed))
