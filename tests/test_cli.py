"""`trimdb` commands run through click's CliRunner, checked against the rows they write."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import click
import duckdb
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from cli.main import all_commands, cli
from tests.conftest import POOL, TARGETS, write_jsonl
from trimdb.store import Store, head_revision, schema_revision, upgrade_schema

COMMANDS = all_commands()

# Every table that a command can write, in the order the migrations create them.
TABLES = ("catalog", "runs", "sources", "samples", "tokens", "segments", "skipped",
          "tasks", "fingerprints", "scores", "selections")
EXTRA_POOL = [
    ("Name three colors.", "red, green and blue"),
    ("Count from one to three.", "one, two, three"),
]


def invoke(*args):
    """Run `trimdb ARGS` in process and return click's Result."""
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def invoke_ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def index_args(db, model, *corpus):
    return ["index", *corpus, "--db", db, "--model", model, "--layers", 2, "--no-progress"]


def query_args(db, target, budget, task="math"):
    return ["query", "--db", db, "--task", f"{task}={target}", "--budget", budget, "--layers", 2,
            "--no-progress"]


def copy_db(source: Path, folder: Path) -> Path:
    """Copy a database file and its vector folder into ``folder``; return the new database path."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    shutil.copy(source, target)
    vectors = Path(f"{source}.vectors")
    if vectors.exists():
        shutil.copytree(vectors, Path(f"{target}.vectors"))
    return target


def snapshot(db: Path) -> dict | None:
    """Return the row count of every table and the vector file names, or None when ``db`` is absent."""
    if not db.exists():
        return None
    with duckdb.connect(str(db), read_only=True) as connection:
        existing = {row[0] for row in connection.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        counts = {t: connection.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES if t in existing}
    vectors = Path(f"{db}.vectors")
    counts["files"] = sorted(p.name for p in vectors.iterdir()) if vectors.exists() else []
    return counts


def rows(db: Path, sql: str, parameters=()) -> list[tuple]:
    with Store(db, read_only=True) as store:
        return store.query(sql, list(parameters)).fetchall()


def scalar(db: Path, sql: str, parameters=()):
    return rows(db, sql, parameters)[0][0]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    """A database indexed from POOL (run 1) and queried for "math" at 25% (run 2) and at 5 samples (run 3)."""
    folder = tmp_path_factory.mktemp("built")
    pool = write_jsonl(folder / "pool.jsonl", POOL)
    target = write_jsonl(folder / "math.jsonl", TARGETS)
    db = folder / "pool.duckdb"
    invoke_ok(*index_args(db, tiny_model_dir, pool))
    invoke_ok(*query_args(db, target, "25%"))
    invoke_ok(*query_args(db, target, "5"))
    return {"db": db, "pool": pool, "target": target, "model": tiny_model_dir}


# index -------------------------------------------------------------------------------------


def test_index_writes_samples(built):
    assert scalar(built["db"], "SELECT count(*) FROM samples") == len(POOL)
    assert scalar(built["db"], "SELECT min(n_tokens) FROM samples") > 0


def test_index_writes_token_rows(built):
    n_tokens = scalar(built["db"], "SELECT sum(n_tokens) FROM samples")
    assert scalar(built["db"], "SELECT count(*) FROM tokens") == n_tokens
    assert scalar(built["db"], "SELECT count(*) FROM tokens WHERE saliency IS NULL") == 0


def test_index_writes_segment(built):
    (segment_id, run_id, file, n_vectors, first_key, last_key, dim), = rows(
        built["db"], "SELECT segment_id, run_id, file, n_vectors, first_token_key, last_token_key, dim FROM segments")
    min_key, max_key, n_tokens = rows(built["db"], "SELECT min(token_key), max(token_key), count(*) FROM tokens")[0]
    assert (segment_id, run_id) == (1, 1)
    assert (Path(f"{built['db']}.vectors") / file).is_file()
    assert n_vectors == n_tokens
    assert (first_key, last_key) == (min_key, max_key)
    assert dim == 64


def test_index_records_run(built):
    kind, finished_at, arguments, settings, stats = rows(
        built["db"], "SELECT kind, finished_at, arguments, settings, stats FROM runs WHERE run_id = 1")[0]
    assert kind == "index"
    assert finished_at is not None
    assert json.loads(arguments)["corpus"] == [str(built["pool"])]
    assert json.loads(settings)["saliency"]["layers"] == 2
    assert json.loads(settings)["store_saliency"] is True
    assert json.loads(stats)["n_samples"] == len(POOL)


def test_index_writes_catalog(built):
    with Store(built["db"], read_only=True) as store:
        catalog = store.catalog()
    assert catalog["model"]["path"] == str(Path(built["model"]).resolve())
    assert catalog["model"]["num_layers"] == 2
    assert catalog["index_settings"]["saliency"]["layers"] == 2


def test_index_append_adds_samples(built, tmp_path):
    db = copy_db(built["db"], tmp_path / "copy")
    extra = write_jsonl(tmp_path / "extra.jsonl", EXTRA_POOL, style="alpaca")
    invoke_ok(*index_args(db, built["model"], extra))

    assert scalar(db, "SELECT count(*) FROM samples") == len(POOL) + len(EXTRA_POOL)
    assert scalar(db, "SELECT count(*) FROM samples WHERE run_id = 4") == len(EXTRA_POOL)
    assert scalar(db, "SELECT count(*) FROM tokens") == scalar(db, "SELECT sum(n_tokens) FROM samples")
    assert scalar(db, "SELECT count(*) FROM segments") == 2
    assert [row[0] for row in rows(db, "SELECT name FROM sources ORDER BY source_id")] == ["pool", "extra"]


def test_index_same_file_counts_already_indexed(built, tmp_path):
    db = copy_db(built["db"], tmp_path / "copy")
    before = snapshot(db)
    result = invoke_ok(*index_args(db, built["model"], built["pool"]))

    assert f"{len(POOL)} samples were already in the index" in result.output
    stats = json.loads(scalar(db, "SELECT stats FROM runs WHERE run_id = 4"))
    assert stats["n_already_indexed"] == len(POOL)
    assert stats["n_duplicates"] == 0
    assert rows(db, "SELECT * FROM skipped WHERE run_id = 4") == []
    after = snapshot(db)
    for table in ("samples", "tokens", "segments", "files"):
        assert after[table] == before[table], table


# query -------------------------------------------------------------------------------------


def test_query_records_run(built):
    kind, arguments, settings = rows(built["db"], "SELECT kind, arguments, settings FROM runs WHERE run_id = 2")[0]
    assert kind == "query"
    assert json.loads(arguments)["tasks"] == {"math": str(built["target"])}
    assert json.loads(settings)["budget"] == ["fraction", 0.25]
    assert json.loads(settings)["saliency"]["layers"] == 2
    assert json.loads(settings)["scope"] == "all"


def test_query_writes_task_row(built):
    (target_path, n_targets, n_fingerprints, n_scored, n_selected), = rows(
        built["db"], "SELECT target_path, n_targets, n_fingerprints, n_scored, n_selected FROM tasks "
                     "WHERE run_id = 2 AND task = 'math'")
    assert target_path == str(built["target"])
    assert n_targets == len(TARGETS)
    assert n_fingerprints > 0
    assert n_scored == len(POOL)
    assert n_selected == 3


def test_query_writes_ranked_scores(built):
    scored = rows(built["db"], "SELECT rank, score FROM scores WHERE run_id = 2 AND task = 'math' ORDER BY rank")
    assert [rank for rank, _ in scored] == list(range(1, len(POOL) + 1))
    assert [score for _, score in scored] == sorted((score for _, score in scored), reverse=True)


@pytest.mark.parametrize("run_id, budget, expected", [(2, "25%", 3), (3, "5", 5)])
def test_query_selection_size(built, run_id, budget, expected):
    selected = rows(built["db"], "SELECT rank FROM selections WHERE run_id = ? ORDER BY rank", [run_id])
    assert [rank for rank, in selected] == list(range(1, expected + 1))
    top = rows(built["db"], "SELECT sample_key FROM scores WHERE run_id = ? AND rank <= ? ORDER BY rank",
               [run_id, expected])
    chosen = rows(built["db"], "SELECT sample_key FROM selections WHERE run_id = ? ORDER BY rank", [run_id])
    assert chosen == top


def test_query_writes_fingerprints(built):
    n_fingerprints = scalar(built["db"], "SELECT n_fingerprints FROM tasks WHERE run_id = 2")
    stored = rows(built["db"], "SELECT token_class, n_occurrences, len(vector) FROM fingerprints WHERE run_id = 2")
    assert len(stored) == n_fingerprints
    assert len({token_class for token_class, _, _ in stored}) == n_fingerprints
    assert all(occurrences >= 1 for _, occurrences, _ in stored)
    assert all(dim == 64 for _, _, dim in stored)


# export ------------------------------------------------------------------------------------


def original_records(built, run_id: int) -> list[dict]:
    """Return the pool file's records at the lines that ``run_id`` selected, in rank order."""
    lines = built["pool"].read_text().splitlines()
    selected = rows(built["db"], "SELECT s.line FROM selections sel JOIN samples s USING (sample_key) "
                                 "WHERE sel.run_id = ? ORDER BY sel.rank", [run_id])
    return [json.loads(lines[line - 1]) for line, in selected]


def test_export_jsonl_rank_order(built, tmp_path):
    output = tmp_path / "coreset.jsonl"
    result = invoke_ok("export", "--db", built["db"], "--task", "math", "-o", output)

    exported = [json.loads(line) for line in output.read_text().splitlines()]
    assert exported == original_records(built, 3)
    assert f"wrote 5 records to {output}" in result.output


def test_export_parquet_is_readable(built, tmp_path):
    output = tmp_path / "coreset.parquet"
    invoke_ok("export", "--db", built["db"], "--task", "math", "--run", 2, "-o", output)
    assert pq.read_table(output).to_pylist() == original_records(built, 2)


def test_export_where_matches_python_filter(built, tmp_path):
    selected = rows(built["db"], "SELECT record, n_tokens FROM scored WHERE run_id = 3 AND task = 'math' "
                                 "AND selected ORDER BY rank")
    threshold = max(n_tokens for _, n_tokens in selected)
    expected = [json.loads(record) for record, n_tokens in selected if n_tokens < threshold]
    output = tmp_path / "short.jsonl"
    invoke_ok("export", "--db", built["db"], "--task", "math", "--where", f"n_tokens < {threshold}", "-o", output)

    exported = [json.loads(line) for line in output.read_text().splitlines()]
    assert 0 < len(exported) < len(selected)
    assert exported == expected


# sql and migrate ---------------------------------------------------------------------------

SAMPLE_SQL = "SELECT sample_id, line, n_tokens FROM samples ORDER BY sample_key"


def test_sql_output_csv(built):
    result = invoke_ok("sql", "--db", built["db"], SAMPLE_SQL, "--output", "csv")
    printed = list(csv.reader(io.StringIO(result.output)))
    assert printed[0] == ["sample_id", "line", "n_tokens"]
    assert printed[1:] == [[str(value) for value in row] for row in rows(built["db"], SAMPLE_SQL)]


def test_sql_output_jsonl(built):
    result = invoke_ok("sql", "--db", built["db"], SAMPLE_SQL, "--output", "jsonl")
    printed = [json.loads(line) for line in result.output.splitlines()]
    expected = [dict(zip(("sample_id", "line", "n_tokens"), row)) for row in rows(built["db"], SAMPLE_SQL)]
    assert printed == expected


def test_sql_output_table(built):
    result = invoke_ok("sql", "--db", built["db"], "SELECT count(*) AS n_samples FROM samples")
    assert "n_samples" in result.output
    assert str(len(POOL)) in result.output


def test_migrate_upgrades_revision_0001(tmp_path):
    db = tmp_path / "old.duckdb"
    engine = sa.create_engine(f"duckdb:///{db}", poolclass=sa.pool.StaticPool)
    with engine.connect() as connection:
        upgrade_schema(connection, "0001")
        connection.exec_driver_sql("INSERT INTO catalog VALUES ('note', '\"kept\"')")
        connection.commit()
    engine.dispose()

    result = invoke_ok("migrate", "--db", db)
    assert "is at the current schema" in result.output
    with Store(db, read_only=True) as store:
        assert schema_revision(store.connection) == head_revision()
        assert store.catalog() == {"note": "kept"}
        assert store.query("SELECT count(*) FROM selections").fetchone()[0] == 0


def test_migrate_keeps_current_database(built, tmp_path):
    db = copy_db(built["db"], tmp_path / "copy")
    before = snapshot(db)
    invoke_ok("migrate", "--db", db)
    assert snapshot(db) == before


# help --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_has_example(name):
    result = invoke_ok(name, "--help")
    assert COMMANDS[name].help
    assert f"trimdb {name} " in result.output, f"`trimdb {name} --help` shows no example command line"



def test_database_commands_start_without_torch(built):
    """`trimdb sql` and `trimdb info` read the database only, so they import neither torch nor transformers."""
    db = built["db"]
    code = ("import sys; from click.testing import CliRunner; from cli.main import cli; "
            f"sql = CliRunner().invoke(cli, ['sql', '--db', {str(db)!r}, 'SELECT count(*) FROM samples']); "
            f"info = CliRunner().invoke(cli, ['info', '--db', {str(db)!r}]); "
            "assert sql.exit_code == 0 and info.exit_code == 0, sql.output + info.output; "
            "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_help_covers_every_option():
    missing = []
    for command in [cli, *COMMANDS.values()]:
        for param in command.params:
            if isinstance(param, click.Option) and not (param.help or "").strip():
                missing.append(f"{command.name} {'/'.join(param.opts)}")
    assert missing == []
