"""Bad input to `trimdb` commands: a non-zero exit, a message that names the fault, and an unchanged database."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from tests.conftest import POOL, TARGETS, write_jsonl
from tests.test_cli import copy_db, index_args, invoke, invoke_ok, query_args, rows, snapshot
from tests.tiny import save_tiny_model
from trimdb.errors import InputError, SettingsError, StorageError
from trimdb.indexing import index_corpus
from trimdb.query import query_tasks
from trimdb.settings import IndexSettings, SaliencySettings
from trimdb.store import Store

GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "Add 2 and 2."},
                                     {"role": "assistant", "content": "2 + 2 = 4."}]})
OTHER_GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "Name a fruit."},
                                           {"role": "assistant", "content": "apple"}]})
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_model_dir):
    """A database indexed from POOL and queried once for task "math"."""
    folder = tmp_path_factory.mktemp("indexed")
    pool = write_jsonl(folder / "pool.jsonl", POOL)
    target = write_jsonl(folder / "math.jsonl", TARGETS)
    db = folder / "pool.duckdb"
    invoke_ok(*index_args(db, tiny_model_dir, pool))
    invoke_ok(*query_args(db, target, "25%"))
    return {"db": db, "pool": pool, "target": target, "model": tiny_model_dir}


@pytest.fixture
def db_copy(indexed, tmp_path):
    """A private copy of the indexed database, with its snapshot before the test acts."""
    db = copy_db(indexed["db"], tmp_path / "copy")
    return db, snapshot(db)


def assert_failed(result, *fragments, exit_code=1):
    assert result.exit_code == exit_code, result.output
    for fragment in fragments:
        assert fragment in result.output


def assert_nothing_indexed(db: Path):
    """Pass when ``db`` does not exist, or contains its schema and no rows."""
    counts = snapshot(db)
    if counts is None:
        return
    assert counts["files"] == []
    assert {table: count for table, count in counts.items() if table != "files" and count} == {}


# index -------------------------------------------------------------------------------------


@pytest.fixture
def bad_corpus(tmp_path):
    """A JSONL corpus whose line 2 is not valid JSON."""
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD_LINE}\n{{not json\n{OTHER_GOOD_LINE}\n")
    return path


def test_index_invalid_json_stops(tmp_path, tiny_model_dir, bad_corpus):
    db = tmp_path / "new.duckdb"
    result = invoke(*index_args(db, tiny_model_dir, bad_corpus))
    assert_failed(result, f"{bad_corpus}:2: invalid JSON")
    assert_nothing_indexed(db)


def test_index_invalid_json_stops_append(db_copy, tiny_model_dir, bad_corpus):
    db, before = db_copy
    result = invoke(*index_args(db, tiny_model_dir, bad_corpus))
    assert_failed(result, f"{bad_corpus}:2: invalid JSON")
    assert snapshot(db) == before


def test_index_invalid_json_skip(tmp_path, tiny_model_dir, bad_corpus):
    db = tmp_path / "new.duckdb"
    result = invoke_ok(*index_args(db, tiny_model_dir, bad_corpus), "--on-error", "skip")

    assert "skipped 1 records (0 duplicates)" in result.output
    assert rows(db, "SELECT line FROM samples ORDER BY line") == [(1,), (3,)]
    (path, line, field, reason), = rows(db, "SELECT path, line, field, reason FROM skipped")
    assert (path, line, field) == (str(bad_corpus), 2, None)
    assert reason.startswith("invalid JSON")
    stats = json.loads(rows(db, "SELECT stats FROM runs")[0][0])
    assert (stats["n_samples"], stats["n_skipped"], stats["n_duplicates"]) == (2, 1, 0)


def test_index_invalid_field(tmp_path, tiny_model_dir):
    corpus = tmp_path / "roles.jsonl"
    record = {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    corpus.write_text(f"{GOOD_LINE}\n{json.dumps(record)}\n")
    db = tmp_path / "new.duckdb"
    result = invoke(*index_args(db, tiny_model_dir, corpus))
    assert_failed(result, f"{corpus}:2: field 'messages[0].role': unknown role 'robot'")
    assert_nothing_indexed(db)


def test_index_unknown_format(tmp_path, tiny_model_dir, pool_file):
    db = tmp_path / "new.duckdb"
    result = invoke(*index_args(db, tiny_model_dir, pool_file), "--format", "csv")
    assert_failed(result, "Invalid value for '--format': 'csv' is not one of", exit_code=2)
    assert not db.exists()


def test_index_missing_corpus(tmp_path, tiny_model_dir):
    db = tmp_path / "new.duckdb"
    result = invoke(*index_args(db, tiny_model_dir, tmp_path / "absent.jsonl"))
    assert_failed(result, "absent.jsonl", "does not exist", exit_code=2)
    assert not db.exists()


def test_index_into_non_duckdb_file(tmp_path, tiny_model_dir, pool_file, caplog):
    """DuckDB would open a JSONL file as an empty in-memory database, and the index would vanish."""
    db = tmp_path / "pool-copy.jsonl"
    db.write_bytes(pool_file.read_bytes())
    caplog.set_level(logging.INFO, logger="trimdb")
    with pytest.raises(StorageError, match="is not a DuckDB database file"):
        index_corpus(db, [pool_file], model=str(tiny_model_dir), settings=IndexSettings(saliency=SaliencySettings(layers=2)), progress=False)
    assert [record.message for record in caplog.records if record.name == "trimdb.models"] == []
    assert db.read_bytes() == pool_file.read_bytes()
    assert not Path(f"{db}.vectors").exists()


@pytest.mark.parametrize("command", [["info"], ["migrate"], ["sql", "SELECT 1"]])
def test_read_non_duckdb_file(pool_file, command):
    result = invoke(command[0], "--db", pool_file, *command[1:])
    assert_failed(result, f"{pool_file} is not a DuckDB database file")


def test_index_too_many_layers(tmp_path, tiny_model_dir, pool_file):
    db = tmp_path / "new.duckdb"
    result = invoke("index", pool_file, "--db", db, "--model", tiny_model_dir, "--layers", 5, "--no-progress")
    assert_failed(result, "last 5 layers because the model has 2 layers", "--layers 2 or fewer")
    assert not db.exists()


def test_index_other_settings_rejected(db_copy, tiny_model_dir, tmp_path):
    db, before = db_copy
    extra = write_jsonl(tmp_path / "extra.jsonl", [("Say hi.", "hi")])
    result = invoke(*index_args(db, tiny_model_dir, extra), "--max-length", 256)
    assert_failed(result, "other index settings", "max_length: index 1024, now 256")
    assert snapshot(db) == before


def test_index_database_in_use(db_copy, tiny_model_dir, tmp_path):
    db, before = db_copy
    holder = ("import sys, time\nfrom trimdb.store import Store\n"
              "store = Store(sys.argv[1])\nprint('open', flush=True)\ntime.sleep(60)\n")
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-c", holder, str(db)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout.readline().strip() == "open"
        extra = write_jsonl(tmp_path / "extra.jsonl", [("Say hi.", "hi")])
        result = invoke(*index_args(db, tiny_model_dir, extra))
    finally:
        process.kill()
        process.wait()
    assert_failed(result, f"database {db} is in use by another process", "wait for it to finish")
    assert snapshot(db) == before


# query -------------------------------------------------------------------------------------


def test_query_task_without_file(db_copy):
    db, before = db_copy
    result = invoke("query", "--db", db, "--task", "math", "--budget", "5%")
    assert_failed(result, "Invalid value for '--task': 'math' is not NAME=FILE", exit_code=2)
    assert snapshot(db) == before


def test_query_missing_target_file(db_copy, tmp_path):
    db, before = db_copy
    missing = tmp_path / "absent.jsonl"
    result = invoke(*query_args(db, missing, "5%"))
    assert_failed(result, f"{missing}: path not found")
    assert snapshot(db) == before


def test_query_missing_target_before_model_load(db_copy, tmp_path, caplog):
    """A missing target file fails before the model loads."""
    db, before = db_copy
    caplog.set_level(logging.INFO, logger="trimdb")
    with pytest.raises(InputError, match="path not found"):
        query_tasks(db, {"math": tmp_path / "absent.jsonl"}, "5%", progress=False)
    assert [record.message for record in caplog.records if record.name == "trimdb.models"] == []
    assert snapshot(db) == before



@pytest.mark.parametrize("method", ["trim", "bm25", "embedding"])
def test_query_where_keeps_nothing(db_copy, indexed, method):
    db, before = db_copy
    result = invoke(*query_args(db, indexed["target"], "5%"), "--method", method, "--where", "n_tokens < 0")
    assert_failed(result, "--where 'n_tokens < 0' keeps none of the indexed samples")
    assert snapshot(db) == before


def test_query_invalid_where_before_model_load(db_copy, indexed, caplog):
    db, before = db_copy
    caplog.set_level(logging.INFO, logger="trimdb")
    with pytest.raises(SettingsError, match="invalid --where condition"):
        query_tasks(db, {"math": indexed["target"]}, "5%", where="no_such_column > 1", progress=False)
    assert [record.message for record in caplog.records if record.name == "trimdb.models"] == []
    assert snapshot(db) == before


@pytest.mark.parametrize("budget", ["0", "150%", "abc", "0%", "-3"])
def test_query_invalid_budget(db_copy, indexed, budget):
    db, before = db_copy
    result = invoke(*query_args(db, indexed["target"], budget))
    assert_failed(result, f"invalid budget '{budget}'", "such as 5%")
    assert snapshot(db) == before


def test_query_missing_database(tmp_path, indexed):
    db = tmp_path / "absent.duckdb"
    result = invoke(*query_args(db, indexed["target"], "5%"))
    assert_failed(result, f"no trimdb database at {db}", "trimdb index CORPUS")
    assert not db.exists()


def test_query_database_without_samples(tmp_path, indexed):
    db = tmp_path / "new.duckdb"
    Store(db, create=True).close()
    result = invoke(*query_args(db, indexed["target"], "5%"))
    assert_failed(result, f"{db} has no indexed samples yet")
    assert_nothing_indexed(db)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("other-model") / "tiny-llama-seed1", seed=1)


def test_query_other_model(db_copy, indexed, other_model_dir):
    db, before = db_copy
    result = invoke(*query_args(db, indexed["target"], "5%"), "--model", other_model_dir)
    assert_failed(result, str(Path(indexed["model"]).resolve()), str(Path(other_model_dir).resolve()),
                  "weights_sha256", "omit --model")
    assert snapshot(db) == before


def test_query_too_many_layers(db_copy, indexed):
    db, before = db_copy
    result = invoke("query", "--db", db, "--task", f"math={indexed['target']}", "--budget", "5%",
                    "--layers", 3, "--no-progress")
    assert_failed(result, "last 3 layers because the model has 2 layers", "--layers 2 or fewer")
    assert snapshot(db) == before


def test_query_missing_vector_file(db_copy, indexed):
    db, before = db_copy
    segment = Path(f"{db}.vectors") / before["files"][0]
    segment.unlink()
    result = invoke(*query_args(db, indexed["target"], "5%"))
    assert_failed(result, f"vector file {segment} is missing", "rebuild the index")
    assert snapshot(db) == before | {"files": []}


# export ------------------------------------------------------------------------------------


def test_export_csv_rejected(indexed, tmp_path):
    output = tmp_path / "coreset.csv"
    result = invoke("export", "--db", indexed["db"], "--task", "math", "-o", output)
    assert_failed(result, f"cannot export to {output}", ".jsonl or .parquet")
    assert not output.exists()


def test_export_unknown_task(indexed, tmp_path):
    output = tmp_path / "coreset.jsonl"
    result = invoke("export", "--db", indexed["db"], "--task", "gsm8k", "-o", output)
    assert_failed(result, "task 'gsm8k' not found", "tasks: math")
    assert not output.exists()


def test_export_unknown_run(indexed, tmp_path):
    output = tmp_path / "coreset.jsonl"
    result = invoke("export", "--db", indexed["db"], "--task", "math", "--run", 7, "-o", output)
    assert_failed(result, "run 7 has no task 'math'", "its runs are 2")
    assert not output.exists()


def test_export_invalid_where(indexed, tmp_path):
    output = tmp_path / "coreset.jsonl"
    result = invoke("export", "--db", indexed["db"], "--task", "math", "--where", "colour = 'red'", "-o", output)
    assert_failed(result, "invalid --where condition \"colour = 'red'\"", "colour")
    assert "whose columns are run_id, task, rank, sample_id, source, score" in result.output
    assert not output.exists()


def test_export_where_syntax_error(indexed, tmp_path):
    output = tmp_path / "coreset.jsonl"
    result = invoke("export", "--db", indexed["db"], "--task", "math", "--where", "score >", "-o", output)
    assert_failed(result, "invalid --where condition 'score >'", 'syntax error at or near ">"')
    assert "ORDER" not in result.output
    assert not output.exists()


# sql and schema ----------------------------------------------------------------------------


@pytest.mark.parametrize("statement", ["DELETE FROM samples", "DROP TABLE tokens",
                                       "INSERT INTO catalog VALUES ('x', '1')"])
def test_sql_write_rejected(db_copy, statement):
    db, before = db_copy
    result = invoke("sql", "--db", db, statement)
    assert_failed(result, f"trimdb sql opens {db} read-only", "statements that write are rejected")
    assert snapshot(db) == before


def test_sql_invalid_statement(indexed):
    result = invoke("sql", "--db", indexed["db"], "SELEC * FROM samples")
    assert_failed(result, f"SQL failed on {indexed['db']}", "syntax error")



@pytest.mark.parametrize("statement", ["", "  ", ";", " ; "])
def test_sql_empty_statement(indexed, statement):
    result = invoke("sql", "--db", indexed["db"], statement)
    assert_failed(result, "the SQL statement is empty")


def test_sql_unknown_table(indexed):
    result = invoke("sql", "--db", indexed["db"], "SELECT * FROM no_such_table")
    assert_failed(result, f"SQL failed on {indexed['db']}", "no_such_table does not exist")


@pytest.mark.parametrize("command", [["migrate"], ["sql", "SELECT 1"], ["query", "--task", "math=x.jsonl",
                                                                        "--budget", "5%"]])
def test_newer_schema_rejected(db_copy, command):
    db, before = db_copy
    with duckdb.connect(str(db)) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    result = invoke(command[0], "--db", db, *command[1:])
    assert_failed(result, f"{db} has schema revision 9999", "written by a newer trimdb", "upgrade trimdb")
    assert snapshot(db) == before
    with duckdb.connect(str(db), read_only=True) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [("9999",)]
