"""Alembic environment for trimdb's DuckDB schema.

trimdb.store runs migrations on a connection it already holds (a DuckDB file takes one
connection configuration per process), passed in through ``config.attributes["connection"]``.
"""

from alembic import context

# trimdb.store registers the DuckDB implementation that Alembic lacks.
import trimdb.store  # noqa: F401

def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("trimdb migrations run only through trimdb.store, which passes a connection")
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
