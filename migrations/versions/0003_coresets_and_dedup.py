"""Add combined coresets over several tasks, removed duplicates, and a normalized text hash.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

STATEMENTS = [
    # Hash of the lower-cased, whitespace-collapsed message texts; NULL for samples indexed
    # before this revision, which exact deduplication then treats as unique.
    "ALTER TABLE samples ADD COLUMN text_hash VARCHAR",
    # The combined coreset of a query run: per-task rankings taken in round-robin order.
    """CREATE TABLE coresets (
        run_id INTEGER NOT NULL,
        rank INTEGER NOT NULL,
        sample_key BIGINT NOT NULL,
        task VARCHAR NOT NULL,
        task_rank INTEGER NOT NULL
    )""",
    # Samples that deduplication kept out of a selection; task is NULL for the combined coreset.
    """CREATE TABLE removed (
        run_id INTEGER NOT NULL,
        task VARCHAR,
        sample_key BIGINT NOT NULL,
        reason VARCHAR NOT NULL,
        duplicate_of BIGINT NOT NULL,
        similarity DOUBLE
    )""",
    # The combined coreset of the newest query run, with the score that put each sample there.
    """CREATE VIEW combined AS
        SELECT c.run_id, c.rank, c.task, c.task_rank, i.sample_id, i.source, sc.score, i.n_tokens,
               i.n_turns, i.truncated, i.record
        FROM coresets c
        JOIN sample_info i USING (sample_key)
        JOIN scores sc ON sc.run_id = c.run_id AND sc.task = c.task AND sc.sample_key = c.sample_key
        WHERE c.run_id = (SELECT max(run_id) FROM coresets)
        ORDER BY c.rank""",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP VIEW combined")
    op.execute("DROP TABLE removed")
    op.execute("DROP TABLE coresets")
    op.execute("ALTER TABLE samples DROP COLUMN text_hash")
