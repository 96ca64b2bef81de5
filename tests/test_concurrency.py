"""Several processes on one database, `trimdb sql` kept inside the database, and a full disk.

DuckDB 2.0 locks the database file per process. One process may open it read-write, or any number
of processes read-only, but a reader and a writer never overlap. A process that loses the race
gets trimdb's "in use by another process" message and exit code 1, and the database is untouched.

A full disk is simulated with RLIMIT_FSIZE in the child process: a write that would grow a file
past the limit fails with EFBIG ("File too large"), as a write to a full disk fails with ENOSPC.
Python ignores SIGXFSZ, so the write fails instead of killing the process.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import faiss
import pytest

from tests.conftest import POOL, TARGETS, write_jsonl
from tests.test_cli import copy_db, index_args, invoke, invoke_ok, rows, scalar, snapshot

REPO_ROOT = Path(__file__).resolve().parent.parent
# The console script's entry point, run with this interpreter so no PATH lookup is needed.
TRIMDB = [sys.executable, "-c", "from cli.main import main; main()"]
ENV = os.environ | {"PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
# Samples in the pool that `trimdb index` writes while other commands try to open the database.
# With one CPU thread the tiny model needs about 6 s for their forward passes (2 CPU cores). The
# competing commands start with their imports done and finish within about 2 s (an estimate).
CONTENDED_POOL_SIZE = 600
WORDS = "the quick brown fox jumps over lazy dog add solve multiply sea blue sky number list python".split()
DEADLINE_S = 120

# Imports the CLI, creates READY_FILE, waits for GO_FILE, then runs `trimdb ARGS...`. Importing
# torch and transformers takes seconds, so the command starts the moment the test creates GO_FILE.
WAITER = """
import pathlib, sys, time
from cli.main import main
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
ready.touch()
deadline = time.monotonic() + 120
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("no go signal")
    time.sleep(0.01)
sys.argv = ["trimdb", *sys.argv[3:]]
main()
"""
# Opens the database read-only with trimdb's Store, creates READY_FILE and keeps the database open.
READER = """
import pathlib, sys, time
from trimdb.store import Store
store = Store(sys.argv[1], read_only=True)
pathlib.Path(sys.argv[2]).touch()
time.sleep(120)
"""


def wait_for(condition, what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def random_pool(path: Path, count: int) -> Path:
    rng = random.Random(0)
    pairs = [(" ".join(rng.choices(WORDS, k=20)) + f" {i}", " ".join(rng.choices(WORDS, k=20)))
             for i in range(count)]
    return write_jsonl(path, pairs)


@pytest.fixture(scope="module")
def pool_db(tmp_path_factory, tiny_model_dir):
    """A database indexed from POOL."""
    folder = tmp_path_factory.mktemp("pool")
    db = folder / "pool.duckdb"
    invoke_ok(*index_args(db, tiny_model_dir, write_jsonl(folder / "pool.jsonl", POOL)))
    return db


@pytest.fixture
def db_copy(pool_db, tmp_path):
    db = copy_db(pool_db, tmp_path / "copy")
    return db, snapshot(db)


@pytest.fixture
def reader(db_copy, tmp_path):
    """A second process that keeps the database copy open read-only."""
    db, _ = db_copy
    ready = tmp_path / "reader-ready"
    process = subprocess.Popen([sys.executable, "-c", READER, str(db), str(ready)], env=ENV)
    try:
        wait_for(lambda: ready.exists() or process.poll() is not None, "the reader to open the database")
        assert process.poll() is None, "the reader process failed to open the database"
        yield process
    finally:
        stop(process)


# Commands that open the database while `trimdb index` writes it ------------------------------


@pytest.fixture(scope="module")
def contended(tmp_path_factory, tiny_model_dir):
    """Run `trimdb sql` and `trimdb query` while `trimdb index` writes a new database.

    Returns each competing command's exit code and output, whether the index was still running
    when both had finished (so they certainly overlapped it), and the index's exit code.
    """
    folder = tmp_path_factory.mktemp("contended")
    pool = random_pool(folder / "pool.jsonl", CONTENDED_POOL_SIZE)
    target = write_jsonl(folder / "math.jsonl", TARGETS)
    db = folder / "pool.duckdb"
    go = folder / "go"
    commands = {
        "sql": ["sql", "--db", str(db), "SELECT count(*) FROM samples"],
        "query": ["query", "--db", str(db), "--task", f"math={target}", "--budget", "5%", "--no-progress"],
    }
    waiters = {
        name: subprocess.Popen([sys.executable, "-c", WAITER, str(folder / f"{name}-ready"), str(go), *args],
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, args in commands.items()
    }
    log = folder / "index.log"
    index = None
    try:
        with open(log, "w") as log_file:
            # One thread slows the forward passes down and leaves a core for the competing commands.
            index = subprocess.Popen(TRIMDB + list(map(str, index_args(db, tiny_model_dir, pool))),
                                     env=ENV | {"OMP_NUM_THREADS": "1"},
                                     stdout=log_file, stderr=subprocess.STDOUT)
        wait_for(lambda: all((folder / f"{name}-ready").exists() or waiters[name].poll() is not None
                             for name in commands), "the CLI imports")
        for name, waiter in waiters.items():
            assert waiter.poll() is None, f"the {name} process exited early: {waiter.communicate()[0]}"
        # The index keeps the database open from its creation until it exits. Its forward passes
        # start after every record is read and rendered.
        wait_for(lambda: "forward passes over" in log.read_text() or index.poll() is not None,
                 "the index to start its forward passes")
        go.touch()
        outputs = {name: waiter.communicate(timeout=DEADLINE_S)[0] for name, waiter in waiters.items()}
        index_was_running = index.poll() is None
        index.wait(timeout=DEADLINE_S)
    finally:
        for process in [*waiters.values(), *([index] if index else [])]:
            stop(process)
    return {
        "db": db,
        "results": {name: (waiters[name].returncode, outputs[name]) for name in commands},
        "index_was_running": index_was_running,
        "index_returncode": index.returncode,
        "index_log": log.read_text(),
    }


@pytest.mark.parametrize("command", ["sql", "query"])
def test_open_during_index_rejected(contended, command):
    assert contended["index_was_running"], (
        f"the index finished before the competing commands; raise CONTENDED_POOL_SIZE\n{contended['index_log']}"
    )
    returncode, output = contended["results"][command]
    assert returncode == 1, output
    assert f"Error: database {contended['db']} is in use by another process" in output
    assert "wait for it to finish" in output
    assert "Traceback" not in output


def test_index_under_contention_consistent(contended):
    db = contended["db"]
    assert contended["index_returncode"] == 0, contended["index_log"]
    (file, n_vectors), = rows(db, "SELECT file, n_vectors FROM segments")
    assert scalar(db, "SELECT count(*) FROM samples") == CONTENDED_POOL_SIZE
    assert scalar(db, "SELECT count(*) FROM tokens") == scalar(db, "SELECT sum(n_tokens) FROM samples")
    assert n_vectors == scalar(db, "SELECT count(*) FROM tokens")
    assert faiss.read_index(str(Path(f"{db}.vectors") / file)).ntotal == n_vectors


# Readers ---------------------------------------------------------------------------------------


def test_sql_beside_reader(db_copy, reader):
    db, _ = db_copy
    result = invoke_ok("sql", "--db", db, "SELECT count(*) AS n FROM samples", "--output", "jsonl")
    assert json.loads(result.output) == {"n": len(POOL)}


def test_index_beside_reader_rejected(db_copy, reader, tiny_model_dir, tmp_path):
    db, before = db_copy
    extra = write_jsonl(tmp_path / "extra.jsonl", [("Say hi.", "hi")])
    result = invoke(*index_args(db, tiny_model_dir, extra))
    assert result.exit_code == 1, result.output
    assert f"database {db} is in use by another process" in result.output
    assert f"PID {reader.pid}" in result.output
    assert snapshot(db) == before


# `trimdb sql` reaches only the database's own tables ---------------------------------------------


@pytest.mark.parametrize("statement, written", [
    ("COPY samples TO '{folder}/samples.csv'", "samples.csv"),
    ("COPY (SELECT record FROM samples) TO '{folder}/records.parquet' (FORMAT parquet)", "records.parquet"),
    ("EXPORT DATABASE '{folder}/export'", "export"),
    ("ATTACH '{folder}/other.duckdb' AS other", "other.duckdb"),
])
def test_sql_file_write_rejected(db_copy, tmp_path, statement, written):
    db, before = db_copy
    result = invoke("sql", "--db", db, statement.format(folder=tmp_path))
    assert result.exit_code == 1, result.output
    assert f"trimdb sql reads only the tables of {db}" in result.output
    assert "file system operations are disabled" in result.output
    assert not (tmp_path / written).exists()
    assert snapshot(db) == before


def test_sql_attach_existing_rejected(db_copy, pool_db):
    db, _ = db_copy
    result = invoke("sql", "--db", db, f"ATTACH '{pool_db}' AS other (READ_ONLY)")
    assert result.exit_code == 1, result.output
    assert f"Cannot access file \"{pool_db}\"" in result.output


def test_sql_file_read_rejected(db_copy, tmp_path):
    db, _ = db_copy
    outside = write_jsonl(tmp_path / "outside.jsonl", POOL)
    result = invoke("sql", "--db", db, f"SELECT count(*) FROM read_json_auto('{outside}')")
    assert result.exit_code == 1, result.output
    assert f"trimdb sql reads only the tables of {db}" in result.output


def test_sql_external_access_stays_off(db_copy):
    db, _ = db_copy
    result = invoke("sql", "--db", db, "SET enable_external_access = true")
    assert result.exit_code == 1, result.output
    assert "Cannot enable external access" in result.output


def test_sql_reads_tables_and_json(db_copy):
    db, _ = db_copy
    statement = ("SELECT count(*) AS n, count(DISTINCT record->'messages'->0->>'role') AS roles, "
                 "sum(n_tokens) AS tokens FROM sample_info")
    result = invoke_ok("sql", "--db", db, statement, "--output", "jsonl")
    with duckdb.connect(str(db), read_only=True) as connection:
        tokens = connection.execute("SELECT count(*) FROM tokens").fetchone()[0]
    assert json.loads(result.output) == {"n": len(POOL), "roles": 1, "tokens": tokens}


# Full disk -------------------------------------------------------------------------------------


def start_with_file_limit(limit_bytes: int, args: list) -> subprocess.Popen:
    """Start `trimdb ARGS` in a child process that cannot grow any file past ``limit_bytes``."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.Popen(TRIMDB + list(map(str, args)), preexec_fn=limit_file_size, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def conversation_record(prompt: str, response: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], **extra}


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory, pool_db, tiny_model_dir):
    """Run three `trimdb index` processes at once, each with a file size limit that one write exceeds.

    Returns, per case, the exit code and output, the database, its snapshot before the run, and
    the file whose write fails.
    """
    folder = tmp_path_factory.mktemp("full-disk")
    new_db = folder / "new" / "new.duckdb"
    segment_db = copy_db(pool_db, folder / "segment")
    log_db = copy_db(pool_db, folder / "log")
    big_record = conversation_record("Say hi.", "hi", notes="x" * 1_000_000)
    (folder / "big.jsonl").write_text(json.dumps(big_record) + "\n")
    cases = {
        # DuckDB's first writes fit in 20 kB, but the pool's vector segment (about 100 kB) does not.
        "segment-new": (new_db, 20_000, write_jsonl(folder / "pool.jsonl", POOL),
                        Path(f"{new_db}.vectors") / ".segment-000001.faiss.tmp"),
        # The database file already exceeds 150 kB but is only read. The new segment needs about 700 kB.
        "segment-existing": (segment_db, 150_000, random_pool(folder / "extra.jsonl", 20),
                             Path(f"{segment_db}.vectors") / ".segment-000002.faiss.tmp"),
        # The segment (a few kB) fits, but the 1 MB record does not fit in DuckDB's write-ahead log.
        "log": (log_db, 500_000, folder / "big.jsonl", Path(f"{log_db}.wal")),
    }
    before = {name: snapshot(db) for name, (db, *_) in cases.items()}
    processes = {name: start_with_file_limit(limit, index_args(db, tiny_model_dir, corpus))
                 for name, (db, limit, corpus, _) in cases.items()}
    try:
        outputs = {name: process.communicate(timeout=DEADLINE_S)[0] for name, process in processes.items()}
    finally:
        for process in processes.values():
            stop(process)
    return {name: {"returncode": processes[name].returncode, "output": outputs[name], "db": db,
                   "before": before[name], "failed_file": failed_file}
            for name, (db, _, _, failed_file) in cases.items()}


@pytest.mark.parametrize("case", ["segment-new", "segment-existing", "log"])
def test_full_disk_message(full_disk, case):
    result = full_disk[case]
    assert result["returncode"] == 1, result["output"]
    assert f"Error: failed to write {result['failed_file']}: File too large" in result["output"]
    assert "Free space on the disk that holds" in result["output"]
    assert "Traceback" not in result["output"]


def test_full_disk_new_database_removed(full_disk):
    db = full_disk["segment-new"]["db"]
    assert not db.exists()
    assert not Path(f"{db}.vectors").exists()


@pytest.mark.parametrize("case", ["segment-existing", "log"])
def test_full_disk_database_unchanged(full_disk, case):
    result = full_disk[case]
    assert snapshot(result["db"]) == result["before"]
