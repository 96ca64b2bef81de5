"""Create the index tables: catalog, runs, sources, samples, tokens, segments, skipped records.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Token rows have no primary key: DuckDB would build an ART index over millions of rows, and
# token_key is unique by construction (one sequence, assigned in the indexing transaction).
TABLES = [
    """CREATE TABLE catalog (
        key VARCHAR PRIMARY KEY,
        value JSON NOT NULL
    )""",
    """CREATE TABLE runs (
        run_id INTEGER PRIMARY KEY,
        kind VARCHAR NOT NULL,
        started_at TIMESTAMP NOT NULL,
        finished_at TIMESTAMP,
        trimdb_version VARCHAR NOT NULL,
        arguments JSON,
        settings JSON,
        stats JSON
    )""",
    """CREATE TABLE sources (
        source_id INTEGER PRIMARY KEY,
        name VARCHAR NOT NULL UNIQUE,
        run_id INTEGER NOT NULL
    )""",
    """CREATE TABLE samples (
        sample_key BIGINT PRIMARY KEY,
        sample_id VARCHAR NOT NULL UNIQUE,
        source_id INTEGER NOT NULL,
        run_id INTEGER NOT NULL,
        path VARCHAR NOT NULL,
        line INTEGER,
        n_turns INTEGER NOT NULL,
        n_tokens INTEGER NOT NULL,
        n_prompt_tokens INTEGER NOT NULL,
        n_response_tokens INTEGER NOT NULL,
        truncated BOOLEAN NOT NULL,
        record JSON NOT NULL
    )""",
    """CREATE TABLE tokens (
        token_key BIGINT NOT NULL,
        sample_key BIGINT NOT NULL,
        position INTEGER NOT NULL,
        token_class INTEGER NOT NULL,
        part TINYINT NOT NULL,
        saliency REAL
    )""",
    """CREATE TABLE segments (
        segment_id INTEGER PRIMARY KEY,
        run_id INTEGER NOT NULL,
        file VARCHAR NOT NULL,
        n_vectors BIGINT NOT NULL,
        first_token_key BIGINT,
        last_token_key BIGINT,
        dim INTEGER NOT NULL,
        codec VARCHAR NOT NULL,
        bytes BIGINT NOT NULL
    )""",
    """CREATE TABLE skipped (
        run_id INTEGER NOT NULL,
        path VARCHAR NOT NULL,
        line INTEGER,
        field VARCHAR,
        reason VARCHAR NOT NULL
    )""",
]


def upgrade() -> None:
    for statement in TABLES:
        op.execute(statement)


def downgrade() -> None:
    for name in ("skipped", "segments", "tokens", "samples", "sources", "runs", "catalog"):
        op.execute(f"DROP TABLE {name}")
