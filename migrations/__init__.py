"""Alembic migrations of the trimdb DuckDB schema, applied by trimdb.store on open."""
