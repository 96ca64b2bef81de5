"""Add query results (tasks, fingerprints, scores, selections) and views over them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLES = [
    """CREATE TABLE tasks (
        run_id INTEGER NOT NULL,
        task VARCHAR NOT NULL,
        target_path VARCHAR NOT NULL,
        n_targets INTEGER NOT NULL,
        n_target_tokens INTEGER NOT NULL,
        n_fingerprints INTEGER NOT NULL,
        n_scored INTEGER NOT NULL,
        n_selected INTEGER NOT NULL,
        PRIMARY KEY (run_id, task)
    )""",
    """CREATE TABLE fingerprints (
        run_id INTEGER NOT NULL,
        task VARCHAR NOT NULL,
        token_class INTEGER NOT NULL,
        token_text VARCHAR,
        n_occurrences INTEGER NOT NULL,
        saliency_sum REAL NOT NULL,
        vector FLOAT[] NOT NULL
    )""",
    """CREATE TABLE scores (
        run_id INTEGER NOT NULL,
        task VARCHAR NOT NULL,
        sample_key BIGINT NOT NULL,
        score DOUBLE NOT NULL,
        mean_part DOUBLE NOT NULL,
        max_part DOUBLE NOT NULL,
        unseen_share DOUBLE NOT NULL,
        n_tokens INTEGER NOT NULL,
        rank INTEGER NOT NULL
    )""",
    """CREATE TABLE selections (
        run_id INTEGER NOT NULL,
        task VARCHAR NOT NULL,
        rank INTEGER NOT NULL,
        sample_key BIGINT NOT NULL
    )""",
]

VIEWS = [
    # One row per indexed sample with its source name.
    """CREATE VIEW sample_info AS
        SELECT s.sample_id, src.name AS source, s.path, s.line, s.n_turns, s.n_tokens,
               s.n_prompt_tokens, s.n_response_tokens, s.truncated, s.record, s.sample_key
        FROM samples s JOIN sources src USING (source_id)""",
    # The newest query run of each task.
    """CREATE VIEW latest_tasks AS
        SELECT task, max(run_id) AS run_id FROM tasks GROUP BY task""",
    # Every score of every run, joined with the sample's metadata.
    """CREATE VIEW scored AS
        SELECT sc.run_id, sc.task, sc.rank, i.sample_id, i.source, sc.score, sc.mean_part,
               sc.max_part, sc.unseen_share, sc.n_tokens AS n_scored_tokens, i.n_tokens, i.n_turns,
               i.truncated, i.record,
               sel.rank IS NOT NULL AS selected
        FROM scores sc
        JOIN sample_info i USING (sample_key)
        LEFT JOIN selections sel USING (run_id, task, sample_key)""",
    # The coreset of the newest run of each task, in rank order.
    """CREATE VIEW selected AS
        SELECT sc.* EXCLUDE (selected)
        FROM scored sc JOIN latest_tasks USING (task, run_id)
        WHERE sc.selected
        ORDER BY sc.task, sc.rank""",
]


def upgrade() -> None:
    for statement in TABLES + VIEWS:
        op.execute(statement)


def downgrade() -> None:
    for name in ("selected", "scored", "latest_tasks", "sample_info"):
        op.execute(f"DROP VIEW {name}")
    for name in ("selections", "scores", "fingerprints", "tasks"):
        op.execute(f"DROP TABLE {name}")
