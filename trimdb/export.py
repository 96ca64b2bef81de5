"""Read-only SQL over an index, and export of a task's coreset as its original records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from trimdb.errors import SettingsError, StorageError
from trimdb.store import Store

EXPORT_SUFFIXES = (".jsonl", ".parquet")


def run_sql(db_path: str | Path, sql: str, parameters: list | None = None) -> tuple[list[str], list[tuple]]:
    """Run one statement on a read-only connection; return (column names, rows)."""
    if not sql.strip().strip(";").strip():
        raise SettingsError('the SQL statement is empty; pass one, for example "SELECT count(*) FROM samples"')
    with Store(db_path, read_only=True) as store:
        # Without external access, a statement reaches only this database's tables: COPY ... TO,
        # EXPORT DATABASE, ATTACH and read_csv are rejected. DuckDB applies the setting to the
        # database instance until its last connection closes, and no statement can turn it back on.
        store.query("SET enable_external_access = false")
        try:
            cursor = store.query(sql, parameters)
        except duckdb.Error as error:
            raise SettingsError(_sql_message(error, store.path)) from error
        if cursor is None or cursor.description is None:
            return [], []
        return [column[0] for column in cursor.description], cursor.fetchall()


def _sql_message(error: duckdb.Error, path: Path) -> str:
    text = str(error).splitlines()[0]
    if "read-only" in text or "read only" in text:
        return f"trimdb sql opens {path} read-only, so statements that write are rejected: {text}"
    if isinstance(error, duckdb.PermissionException) or "external access" in text:
        return (
            f"trimdb sql reads only the tables of {path}, so statements that read or write other files "
            f"(COPY, EXPORT DATABASE, ATTACH, read_csv) are rejected: {text}. "
            "Write a coreset with `trimdb export`, or open the database with the duckdb client"
        )
    return f"SQL failed on {path}: {text}"


def resolve_run(store: Store, task: str, run_id: int | None) -> int:
    """Return the given run id, or the newest run of ``task``, checking that the task exists there."""
    tasks = [row[0] for row in store.query("SELECT DISTINCT task FROM tasks ORDER BY task").fetchall()]
    if task not in tasks:
        known = ", ".join(tasks) if tasks else "none yet; run `trimdb query` first"
        raise SettingsError(f"task {task!r} not found in {store.path}; tasks: {known}")
    if run_id is None:
        return int(store.query("SELECT max(run_id) FROM tasks WHERE task = ?", [task]).fetchall()[0][0])
    if store.query("SELECT 1 FROM tasks WHERE task = ? AND run_id = ?", [task, run_id]).fetchone() is None:
        runs = [row[0] for row in store.query("SELECT run_id FROM tasks WHERE task = ? ORDER BY run_id", [task]).fetchall()]
        raise SettingsError(f"run {run_id} has no task {task!r}; its runs are {', '.join(map(str, runs))}")
    return run_id


def export_coreset(
    db_path: str | Path, task: str, output: str | Path, *, where: str | None = None, run_id: int | None = None
) -> int:
    """Write the selected samples' original records, in rank order, to JSONL or Parquet; return the count.

    ``where`` is a SQL condition over the columns of the ``scored`` view (source, score, n_tokens,
    record, ...). The file is written under a temporary name and renamed, so a failed export leaves
    no partial file.
    """
    output = Path(output)
    suffix = output.suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        raise SettingsError(f"cannot export to {output}: the file name must end in {' or '.join(EXPORT_SUFFIXES)}")
    with Store(db_path, read_only=True) as store:
        run_id = resolve_run(store, task, run_id)
        if where:
            _check_export_where(store, where)
        condition = f" AND ({where})" if where else ""
        sql = f"SELECT record FROM scored WHERE run_id = ? AND task = ? AND selected{condition} ORDER BY rank"
        try:
            records = [json.loads(row[0]) for row in store.query(sql, [run_id, task]).fetchall()]
        except duckdb.Error as error:
            raise SettingsError(f"invalid --where condition {where!r}: {str(error).splitlines()[0]}") from error
    temporary = output.with_name(f".{output.name}.tmp")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        if suffix == ".jsonl":
            with open(temporary, "w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            _write_parquet(records, temporary)
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    return len(records)


def _check_export_where(store: Store, where: str) -> None:
    """Raise SettingsError when ``where`` alone is not a valid condition over the scored view.

    Checked on its own, the error names the condition, not the SQL that export wraps around it.
    """
    try:
        store.query(f"SELECT 1 FROM (SELECT * FROM scored LIMIT 0) WHERE {where}").fetchall()  # binds, reads no row
    except duckdb.Error as error:
        columns = ", ".join(row[0] for row in store.query("DESCRIBE scored").fetchall())
        raise SettingsError(
            f"invalid --where condition {where!r}: {str(error).splitlines()[0]}; it is SQL over the scored "
            f"view, whose columns are {columns}"
        ) from error


def _write_parquet(records: list[dict], path: Path) -> None:
    try:
        table = pa.Table.from_pylist(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise StorageError(
            f"the selected records do not share one Parquet schema ({error}); export to .jsonl instead"
        ) from error
    pq.write_table(table, path)
