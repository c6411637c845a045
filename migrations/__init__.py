"""The Alembic migrations, the only way the schema changes (installed as the package `erq_migrations`,
so every `erq` process finds them and applies them at start: storage/migrate.py)."""
