"""Schema migrations, the schema snapshot at head, and crash safety of an index run's write."""

from __future__ import annotations

import json

import duckdb
import faiss
import numpy as np
import pytest
import sqlalchemy as sa

import trimdb.indexing
import trimdb.segments
from tests.conftest import POOL, TARGETS, write_jsonl
from trimdb.errors import StorageError
from trimdb.indexing import index_corpus
from trimdb.settings import IndexSettings, SaliencySettings
from trimdb.store import Store, downgrade_schema, head_revision, schema_revision, upgrade_schema

TINY_INDEX = IndexSettings(max_length=128, batch_tokens=256, saliency=SaliencySettings(layers=2))
INDEX_TABLES = ("catalog", "runs", "sources", "samples", "tokens", "segments", "skipped")

# Every table and view at the head revision, with its columns and DuckDB types in order.
# A migration that changes the schema must update this snapshot in the same change.
HEAD_SCHEMA = {
    "alembic_version": [("version_num", "VARCHAR")],
    "catalog": [("key", "VARCHAR"), ("value", "JSON")],
    "combined": [
        ("run_id", "INTEGER"), ("rank", "INTEGER"), ("task", "VARCHAR"), ("task_rank", "INTEGER"),
        ("sample_id", "VARCHAR"), ("source", "VARCHAR"), ("score", "DOUBLE"), ("n_tokens", "INTEGER"),
        ("n_turns", "INTEGER"), ("truncated", "BOOLEAN"), ("record", "JSON"),
    ],
    "coresets": [
        ("run_id", "INTEGER"), ("rank", "INTEGER"), ("sample_key", "BIGINT"), ("task", "VARCHAR"),
        ("task_rank", "INTEGER"),
    ],
    "fingerprints": [
        ("run_id", "INTEGER"), ("task", "VARCHAR"), ("token_class", "INTEGER"), ("token_text", "VARCHAR"),
        ("n_occurrences", "INTEGER"), ("saliency_sum", "FLOAT"), ("vector", "FLOAT[]"),
    ],
    "latest_tasks": [("task", "VARCHAR"), ("run_id", "INTEGER")],
    "runs": [
        ("run_id", "INTEGER"), ("kind", "VARCHAR"), ("started_at", "TIMESTAMP"), ("finished_at", "TIMESTAMP"),
        ("trimdb_version", "VARCHAR"), ("arguments", "JSON"), ("settings", "JSON"), ("stats", "JSON"),
    ],
    "sample_info": [
        ("sample_id", "VARCHAR"), ("source", "VARCHAR"), ("path", "VARCHAR"), ("line", "INTEGER"),
        ("n_turns", "INTEGER"), ("n_tokens", "INTEGER"), ("n_prompt_tokens", "INTEGER"),
        ("n_response_tokens", "INTEGER"), ("truncated", "BOOLEAN"), ("record", "JSON"), ("sample_key", "BIGINT"),
    ],
    "removed": [
        ("run_id", "INTEGER"), ("task", "VARCHAR"), ("sample_key", "BIGINT"), ("reason", "VARCHAR"),
        ("duplicate_of", "BIGINT"), ("similarity", "DOUBLE"),
    ],
    "samples": [
        ("sample_key", "BIGINT"), ("sample_id", "VARCHAR"), ("source_id", "INTEGER"), ("run_id", "INTEGER"),
        ("path", "VARCHAR"), ("line", "INTEGER"), ("n_turns", "INTEGER"), ("n_tokens", "INTEGER"),
        ("n_prompt_tokens", "INTEGER"), ("n_response_tokens", "INTEGER"), ("truncated", "BOOLEAN"),
        ("record", "JSON"), ("text_hash", "VARCHAR"),
    ],
    "scored": [
        ("run_id", "INTEGER"), ("task", "VARCHAR"), ("rank", "INTEGER"), ("sample_id", "VARCHAR"),
        ("source", "VARCHAR"), ("score", "DOUBLE"), ("mean_part", "DOUBLE"), ("max_part", "DOUBLE"),
        ("unseen_share", "DOUBLE"), ("n_scored_tokens", "INTEGER"), ("n_tokens", "INTEGER"),
        ("n_turns", "INTEGER"), ("truncated", "BOOLEAN"), ("record", "JSON"), ("selected", "BOOLEAN"),
    ],
    "scores": [
        ("run_id", "INTEGER"), ("task", "VARCHAR"), ("sample_key", "BIGINT"), ("score", "DOUBLE"),
        ("mean_part", "DOUBLE"), ("max_part", "DOUBLE"), ("unseen_share", "DOUBLE"), ("n_tokens", "INTEGER"),
        ("rank", "INTEGER"),
    ],
    "segments": [
        ("segment_id", "INTEGER"), ("run_id", "INTEGER"), ("file", "VARCHAR"), ("n_vectors", "BIGINT"),
        ("first_token_key", "BIGINT"), ("last_token_key", "BIGINT"), ("dim", "INTEGER"), ("codec", "VARCHAR"),
        ("bytes", "BIGINT"),
    ],
    "selected": [
        ("run_id", "INTEGER"), ("task", "VARCHAR"), ("rank", "INTEGER"), ("sample_id", "VARCHAR"),
        ("source", "VARCHAR"), ("score", "DOUBLE"), ("mean_part", "DOUBLE"), ("max_part", "DOUBLE"),
        ("unseen_share", "DOUBLE"), ("n_scored_tokens", "INTEGER"), ("n_tokens", "INTEGER"),
        ("n_turns", "INTEGER"), ("truncated", "BOOLEAN"), ("record", "JSON"),
    ],
    "selections": [("run_id", "INTEGER"), ("task", "VARCHAR"), ("rank", "INTEGER"), ("sample_key", "BIGINT")],
    "skipped": [
        ("run_id", "INTEGER"), ("path", "VARCHAR"), ("line", "INTEGER"), ("field", "VARCHAR"), ("reason", "VARCHAR"),
    ],
    "sources": [("source_id", "INTEGER"), ("name", "VARCHAR"), ("run_id", "INTEGER")],
    "tasks": [
        ("run_id", "INTEGER"), ("task", "VARCHAR"), ("target_path", "VARCHAR"), ("n_targets", "INTEGER"),
        ("n_target_tokens", "INTEGER"), ("n_fingerprints", "INTEGER"), ("n_scored", "INTEGER"),
        ("n_selected", "INTEGER"),
    ],
    "tokens": [
        ("token_key", "BIGINT"), ("sample_key", "BIGINT"), ("position", "INTEGER"), ("token_class", "INTEGER"),
        ("part", "TINYINT"), ("saliency", "FLOAT"),
    ],
}
VIEWS = {"combined", "latest_tasks", "sample_info", "scored", "selected"}


def schema_of(store: Store) -> dict[str, list[tuple[str, str]]]:
    """Return {table or view: [(column, type), ...]} for the database's main schema."""
    columns = store.query(
        "SELECT table_name, column_name, data_type FROM duckdb_columns() "
        "WHERE database_name = current_database() AND schema_name = 'main' ORDER BY table_name, column_index"
    ).fetchall()
    schema: dict[str, list[tuple[str, str]]] = {}
    for table, column, data_type in columns:
        schema.setdefault(table, []).append((column, data_type))
    return schema


def view_names(store: Store) -> set[str]:
    rows = store.query("SELECT view_name FROM duckdb_views() WHERE database_name = current_database() "
                       "AND NOT internal").fetchall()
    return {name for name, in rows}


def counts(db) -> dict[str, int]:
    with Store(db, read_only=True) as store:
        return {table: store.query(f"SELECT count(*) FROM {table}").fetchone()[0] for table in INDEX_TABLES}


def vector_files(db) -> list[str]:
    folder = db.parent / f"{db.name}.vectors"
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


# Migrations --------------------------------------------------------------------------------


def test_store_upgrades_revision_0001(tmp_path):
    db = tmp_path / "old.duckdb"
    engine = sa.create_engine(f"duckdb:///{db}", poolclass=sa.pool.StaticPool)
    with engine.connect() as connection:
        upgrade_schema(connection, "0001")
        raw = connection.connection.driver_connection
        raw.execute("INSERT INTO catalog VALUES ('model', ?)", [json.dumps({"name": "old"})])
        raw.execute(
            "INSERT INTO samples VALUES (1, 'abc', 1, 1, 'pool.jsonl', 3, 2, 10, 4, 6, false, ?)",
            [json.dumps({"instruction": "hi", "output": "hello"})],
        )
        connection.commit()
        assert schema_revision(connection) == "0001"
    engine.dispose()

    with Store(db) as store:
        assert schema_revision(store.connection) == head_revision()
        assert store.catalog() == {"model": {"name": "old"}}
        assert store.query("SELECT sample_id, line, n_tokens, record FROM samples").fetchall() == [
            ("abc", 3, 10, json.dumps({"instruction": "hi", "output": "hello"}))
        ]
        assert {"tasks", "fingerprints", "scores", "selections"} <= set(schema_of(store))
        assert view_names(store) == VIEWS


def test_store_schema_at_head(tmp_path):
    with Store(tmp_path / "new.duckdb", create=True) as store:
        assert schema_of(store) == HEAD_SCHEMA
        assert view_names(store) == VIEWS


def test_store_downgrade_to_base(tmp_path):
    db = tmp_path / "new.duckdb"
    with Store(db, create=True) as store:
        downgrade_schema(store.connection, "base")
        store.connection.commit()
        assert schema_revision(store.connection) is None
        assert set(schema_of(store)) == {"alembic_version"}
        assert view_names(store) == set()

    with Store(db) as store:
        assert schema_of(store) == HEAD_SCHEMA


def test_store_rejects_newer_revision(tmp_path):
    db = tmp_path / "new.duckdb"
    with Store(db, create=True) as store, store.transaction() as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")

    with pytest.raises(StorageError, match="schema revision 9999, which this trimdb .* does not know"):
        Store(db)
    # The failed open closed its connection: DuckDB rejects a second configuration of an open file.
    with duckdb.connect(str(db), read_only=True) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [("9999",)]


# Crash safety ------------------------------------------------------------------------------


def fail_write_tokens(*arguments):
    raise RuntimeError("simulated crash after the segment file was written")


def test_index_crash_commits_nothing(tmp_path, tiny_model_dir, pool_file, monkeypatch):
    db = tmp_path / "pool.duckdb"
    monkeypatch.setattr(trimdb.segments, "_write_tokens", fail_write_tokens)
    with pytest.raises(RuntimeError, match="simulated crash"):
        index_corpus(db, [pool_file], model=str(tiny_model_dir), settings=TINY_INDEX, progress=False)

    # A run that fails on a new database leaves no database, or one with its schema and no rows.
    if db.exists():
        assert counts(db) == dict.fromkeys(INDEX_TABLES, 0)
    assert vector_files(db) == []


def test_index_crash_keeps_earlier_run(tmp_path, tiny_model_dir, pool_file, monkeypatch):
    db = tmp_path / "pool.duckdb"
    index_corpus(db, [pool_file], model=str(tiny_model_dir), settings=TINY_INDEX, progress=False)
    before, files = counts(db), vector_files(db)
    extra = write_jsonl(tmp_path / "extra.jsonl", TARGETS)
    monkeypatch.setattr(trimdb.segments, "_write_tokens", fail_write_tokens)
    with pytest.raises(RuntimeError, match="simulated crash"):
        index_corpus(db, [extra], model=str(tiny_model_dir), settings=TINY_INDEX, progress=False)

    assert counts(db) == before
    assert vector_files(db) == files == ["segment-000001.faiss"]


def test_index_removes_orphan_segment(tmp_path, tiny_model_dir, pool_file):
    db = tmp_path / "pool.duckdb"
    index_corpus(db, [pool_file], model=str(tiny_model_dir), settings=TINY_INDEX, progress=False)
    folder = db.parent / f"{db.name}.vectors"
    # A crashed run leaves either a finished segment file that no row references or a temporary file.
    faiss.write_index(faiss.IndexIDMap2(faiss.IndexFlatIP(64)), str(folder / "segment-000099.faiss"))
    (folder / ".segment-000002.faiss.tmp").write_bytes(np.zeros(16, np.uint8).tobytes())

    extra = write_jsonl(tmp_path / "extra.jsonl", TARGETS)
    index_corpus(db, [extra], model=str(tiny_model_dir), settings=TINY_INDEX, progress=False)
    assert vector_files(db) == ["segment-000001.faiss", "segment-000002.faiss"]
    with Store(db, read_only=True) as store:
        assert [segment.file for segment in store.segments()] == vector_files(db)
        assert store.query("SELECT count(*) FROM samples").fetchone()[0] == len(POOL) + len(TARGETS)
