"""The migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""
from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from storage.db import engine_for
from storage.models import Base


def test_the_head_migration_matches_the_models(settings):
    """No drift: a column, index, type or nullability the models have and the migrations not (or the reverse)."""
    with engine_for(settings.database_url).connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "render_as_batch": True})
        drift = compare_metadata(context, Base.metadata)
    assert drift == [], f"the models and the head migration differ; add a migration: {drift}"
