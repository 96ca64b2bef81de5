"""`trimdb info`: a read-only description of a database, from its catalog, tables and files.

The description covers the model identity and index settings stored at the first index run,
the schema revision, sources, runs, tasks, skipped records and disk use. Every value comes from
the database or the file system, so the description never loads the model.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from trimdb import __version__
from trimdb.store import Store, schema_revision


def describe_index(db_path: str | Path) -> dict:
    """Describe the database at ``db_path`` as a JSON-serializable dict, opening it read-only.

    Raises StorageError for a missing file, a file that is not a DuckDB database, or a schema
    that needs `trimdb migrate`. A database with no index run has ``model`` set to None.
    """
    with Store(db_path, read_only=True) as store:
        catalog = store.catalog()
        description = {
            "database": {
                "path": str(store.path),
                "schema_revision": schema_revision(store.connection),
                "trimdb_version": __version__,
            },
            "model": catalog.get("model"),
            "index_settings": catalog.get("index_settings"),
            "totals": _totals(store),
            "sources": _sources(store),
            "runs": _runs(store),
            "tasks": _tasks(store),
            "skipped": _skipped(store),
        }
        description["disk"] = _disk(store, description["totals"]["n_tokens"])
    return description


def _totals(store: Store) -> dict:
    n_samples, n_truncated, n_prompt, n_response = store.query(
        "SELECT count(*), count(*) FILTER (WHERE truncated), coalesce(sum(n_prompt_tokens), 0), "
        "coalesce(sum(n_response_tokens), 0) FROM samples").fetchone()
    n_segments, n_vectors = store.query("SELECT count(*), coalesce(sum(n_vectors), 0) FROM segments").fetchone()
    return {
        "n_samples": int(n_samples),
        "n_truncated": int(n_truncated),
        "n_tokens": int(store.query("SELECT count(*) FROM tokens").fetchall()[0][0]),
        "n_prompt_tokens": int(n_prompt),
        "n_response_tokens": int(n_response),
        "n_segments": int(n_segments),
        "n_vectors": int(n_vectors),
        "n_runs": int(store.query("SELECT count(*) FROM runs").fetchall()[0][0]),
        "n_tasks": int(store.query("SELECT count(DISTINCT task) FROM tasks").fetchall()[0][0]),
    }


def _sources(store: Store) -> list[dict]:
    rows = store.query(
        "SELECT src.source_id, src.name, src.run_id, count(s.sample_key), coalesce(sum(s.n_tokens), 0), "
        "count(*) FILTER (WHERE s.truncated) "
        "FROM sources src LEFT JOIN samples s USING (source_id) "
        "GROUP BY src.source_id, src.name, src.run_id ORDER BY src.source_id").fetchall()
    columns = ("source_id", "name", "run_id", "n_samples", "n_tokens", "n_truncated")
    return [dict(zip(columns, (source_id, name, run_id, *map(int, counts))))
            for source_id, name, run_id, *counts in rows]


def _runs(store: Store) -> list[dict]:
    """Return every run with its arguments, settings and stats.

    A run's row is written when its results are committed, so started_at and finished_at bracket
    the write only. ``seconds`` is the whole run's time, taken from its stats where it is stored.
    """
    rows = store.query(
        "SELECT run_id, kind, started_at, finished_at, trimdb_version, arguments, settings, stats "
        "FROM runs ORDER BY run_id").fetchall()
    runs = []
    for run_id, kind, started_at, finished_at, version, arguments, settings, stats in rows:
        stats = _json(stats)
        runs.append({
            "run_id": run_id,
            "kind": kind,
            "started_at": _timestamp(started_at),
            "finished_at": _timestamp(finished_at),
            "seconds": stats.get("seconds") if isinstance(stats, dict) else None,
            "trimdb_version": version,
            "arguments": _json(arguments),
            "settings": _json(settings),
            "stats": stats,
        })
    return runs


def _tasks(store: Store) -> list[dict]:
    """Return one entry per task name with its query runs, oldest first."""
    cursor = store.query("SELECT * FROM tasks ORDER BY task, run_id")
    columns = [column[0] for column in cursor.description]
    tasks: dict[str, dict] = {}
    for row in cursor.fetchall():
        run = dict(zip(columns, row))
        entry = tasks.setdefault(run.pop("task"), {"runs": []})
        entry["runs"].append(run)
    return [{"task": name, "latest_run_id": entry["runs"][-1]["run_id"], "runs": entry["runs"]}
            for name, entry in tasks.items()]


def _skipped(store: Store) -> list[dict]:
    """Return per run the number of skipped records and, from the run's stats, how many were duplicates."""
    rows = store.query(
        "SELECT sk.run_id, count(*), any_value(r.stats) FROM skipped sk LEFT JOIN runs r USING (run_id) "
        "GROUP BY sk.run_id ORDER BY sk.run_id").fetchall()
    return [{"run_id": run_id, "n_skipped": int(count), "n_duplicates": (_json(stats) or {}).get("n_duplicates")}
            for run_id, count, stats in rows]


def _disk(store: Store, n_tokens: int) -> dict:
    """Measure the database file, its write-ahead log and the vector folder on disk."""
    wal = Path(f"{store.path}.wal")
    vector_files = sorted(store.vectors_dir.iterdir()) if store.vectors_dir.is_dir() else []
    database_bytes = store.path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    vectors_bytes = sum(path.stat().st_size for path in vector_files)
    return {
        "database_file": str(store.path),
        "database_bytes": database_bytes,
        "vectors_dir": str(store.vectors_dir),
        "n_vector_files": len(vector_files),
        "vectors_bytes": vectors_bytes,
        "total_bytes": database_bytes + vectors_bytes,
        "bytes_per_token": _per_token(database_bytes + vectors_bytes, n_tokens),
        "database_bytes_per_token": _per_token(database_bytes, n_tokens),
        "vectors_bytes_per_token": _per_token(vectors_bytes, n_tokens),
    }


def _per_token(n_bytes: int, n_tokens: int) -> float | None:
    return n_bytes / n_tokens if n_tokens else None


def _timestamp(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def _json(value: str | None):
    return json.loads(value) if value is not None else None
