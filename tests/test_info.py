"""`trimdb info` and describe_index on a tiny-model database, checked against SQL counts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.conftest import POOL, TARGETS, write_jsonl
from trimdb import __version__
from trimdb.errors import StorageError
from trimdb.info import describe_index
from trimdb.store import Store, head_revision

EXTRA_POOL = [
    ("Name three colors.", "red, green and blue"),
    ("Count from one to three.", "one, two, three"),
]
# A record with no response: `--on-error skip` lists it in the skipped table.
BAD_RECORD = {"instruction": "This record has no output field."}


def invoke_ok(*args):
    # A wide console keeps rich from wrapping table cells, so whole lines can be matched.
    result = CliRunner().invoke(cli, [str(arg) for arg in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def rows(db: Path, sql: str) -> list[tuple]:
    with Store(db, read_only=True) as store:
        return store.query(sql).fetchall()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    """Build a database: runs 1 and 2 index POOL, then POOL again with extra records, and runs 3 and 4 query."""
    folder = tmp_path_factory.mktemp("info")
    pool = write_jsonl(folder / "pool.jsonl", POOL)
    extra = write_jsonl(folder / "extra.jsonl", EXTRA_POOL, style="alpaca")
    with open(extra, "a") as handle:
        handle.write(json.dumps(BAD_RECORD) + "\n")
    math = write_jsonl(folder / "math.jsonl", TARGETS)
    arithmetic = write_jsonl(folder / "arithmetic.jsonl", TARGETS[::2])
    db = folder / "pool.duckdb"
    common = ["--model", tiny_model_dir, "--layers", 2, "--no-progress"]
    invoke_ok("index", pool, "--db", db, *common)
    invoke_ok("index", pool, extra, "--db", db, "--on-error", "skip", *common)
    query = ["query", "--db", db, "--layers", 2, "--no-progress"]
    invoke_ok(*query, "--task", f"math={math}", "--budget", "25%")
    invoke_ok(*query, "--task", f"math={math}", "--task", f"arithmetic={arithmetic}", "--budget", 2)
    return {"db": db, "description": describe_index(db)}


# describe_index ----------------------------------------------------------------------------


def test_describe_model_is_catalog_identity(built):
    with Store(built["db"], read_only=True) as store:
        catalog = store.catalog()
    assert built["description"]["model"] == catalog["model"]
    assert built["description"]["model"]["num_layers"] == 2
    assert built["description"]["model"]["hidden_size"] == 64


def test_describe_index_settings(built):
    with Store(built["db"], read_only=True) as store:
        catalog = store.catalog()
    assert built["description"]["index_settings"] == catalog["index_settings"]
    assert built["description"]["index_settings"]["saliency"]["layers"] == 2


def test_describe_database_versions(built):
    database = built["description"]["database"]
    assert database["schema_revision"] == head_revision()
    assert database["trimdb_version"] == __version__
    assert database["path"] == str(built["db"])


def test_describe_totals(built):
    totals = built["description"]["totals"]
    (n_samples, n_truncated, n_prompt, n_response), = rows(
        built["db"], "SELECT count(*), count(*) FILTER (WHERE truncated), sum(n_prompt_tokens), "
                     "sum(n_response_tokens) FROM samples")
    n_tokens = rows(built["db"], "SELECT count(*) FROM tokens")[0][0]
    assert n_samples == len(POOL) + len(EXTRA_POOL)
    assert totals["n_samples"] == n_samples
    assert totals["n_truncated"] == n_truncated
    assert totals["n_tokens"] == n_tokens
    assert totals["n_prompt_tokens"] + totals["n_response_tokens"] == n_tokens
    assert (totals["n_prompt_tokens"], totals["n_response_tokens"]) == (n_prompt, n_response)
    assert totals["n_vectors"] == n_tokens
    assert totals["n_segments"] == 2
    assert (totals["n_runs"], totals["n_tasks"]) == (4, 2)


def test_describe_sources(built):
    expected = rows(
        built["db"], "SELECT src.name, src.run_id, count(DISTINCT s.sample_key), count(t.token_key) "
                     "FROM sources src JOIN samples s USING (source_id) JOIN tokens t USING (sample_key) "
                     "GROUP BY src.source_id, src.name, src.run_id ORDER BY src.source_id")
    described = [(s["name"], s["run_id"], s["n_samples"], s["n_tokens"]) for s in built["description"]["sources"]]
    assert described == expected
    assert [name for name, *_ in described] == ["pool", "extra"]
    assert [n_samples for _, _, n_samples, _ in described] == [len(POOL), len(EXTRA_POOL)]


def test_describe_runs(built):
    runs = built["description"]["runs"]
    stored = rows(built["db"], "SELECT run_id, kind, stats FROM runs ORDER BY run_id")
    assert [(run["run_id"], run["kind"]) for run in runs] == [(run_id, kind) for run_id, kind, _ in stored]
    assert [run["kind"] for run in runs] == ["index", "index", "query", "query"]
    assert [run["stats"] for run in runs] == [json.loads(stats) for _, _, stats in stored]


def test_describe_run_seconds(built):
    runs = built["description"]["runs"]
    assert {run["kind"] for run in runs} == {"index", "query"}
    assert all(run["seconds"] == run["stats"]["seconds"] for run in runs)
    assert all(run["seconds"] > 0 for run in runs)
    assert all(run["started_at"] <= run["finished_at"] for run in runs)


def test_describe_tasks(built):
    stored = rows(built["db"], "SELECT task, run_id, n_targets, n_fingerprints, n_scored, n_selected "
                               "FROM tasks ORDER BY task, run_id")
    described = [(task["task"], run["run_id"], run["n_targets"], run["n_fingerprints"], run["n_scored"],
                  run["n_selected"]) for task in built["description"]["tasks"] for run in task["runs"]]
    assert described == stored
    assert {task["task"]: task["latest_run_id"] for task in built["description"]["tasks"]} == {
        "arithmetic": 4, "math": 4}


@pytest.mark.parametrize("task, run_id, n_targets, n_selected", [
    ("math", 3, len(TARGETS), 4),
    ("math", 4, len(TARGETS), 2),
    ("arithmetic", 4, len(TARGETS[::2]), 2),
])
def test_describe_task_run_counts(built, task, run_id, n_targets, n_selected):
    entry = next(t for t in built["description"]["tasks"] if t["task"] == task)
    run = next(r for r in entry["runs"] if r["run_id"] == run_id)
    n_samples = len(POOL) + len(EXTRA_POOL)
    assert (run["n_targets"], run["n_scored"], run["n_selected"]) == (n_targets, n_samples, n_selected)


def test_describe_skipped_by_run(built):
    stored = rows(built["db"], "SELECT run_id, count(*) FROM skipped GROUP BY run_id ORDER BY run_id")
    skipped = built["description"]["skipped"]
    assert [(row["run_id"], row["n_skipped"]) for row in skipped] == stored
    assert [row["run_id"] for row in skipped] == [2]


def test_describe_skipped_duplicates_from_stats(built):
    stats = {run["run_id"]: run["stats"] for run in built["description"]["runs"]}
    for row in built["description"]["skipped"]:
        assert row["n_duplicates"] == stats[row["run_id"]]["n_duplicates"]


def test_describe_disk_use(built):
    disk = built["description"]["disk"]
    segment_bytes = rows(built["db"], "SELECT sum(bytes) FROM segments")[0][0]
    n_tokens = built["description"]["totals"]["n_tokens"]
    assert disk["database_bytes"] == built["db"].stat().st_size
    assert disk["vectors_bytes"] == segment_bytes
    assert disk["n_vector_files"] == 2
    assert disk["total_bytes"] == disk["database_bytes"] + disk["vectors_bytes"]
    assert disk["bytes_per_token"] == pytest.approx(disk["total_bytes"] / n_tokens)
    # A flat float32 segment costs 4 bytes per dimension, plus the token key and a small header.
    assert 4 * 64 < disk["vectors_bytes_per_token"] < 4 * 64 + 16


def test_describe_missing_database(tmp_path):
    with pytest.raises(StorageError, match="no trimdb database at .*absent.duckdb; build one with `trimdb index"):
        describe_index(tmp_path / "absent.duckdb")


def test_describe_empty_database(tmp_path):
    db = tmp_path / "empty.duckdb"
    Store(db, create=True).close()
    description = describe_index(db)
    assert description["model"] is None
    assert description["index_settings"] is None
    assert set(description["totals"].values()) == {0}
    assert (description["sources"], description["runs"], description["tasks"]) == ([], [], [])
    assert description["disk"]["bytes_per_token"] is None


# trimdb info -------------------------------------------------------------------------------


def test_info_json_matches_describe(built):
    result = invoke_ok("info", "--db", built["db"], "--json")
    assert json.loads(result.output) == json.loads(json.dumps(built["description"]))


def test_info_tables_shorten_hashes(built):
    result = invoke_ok("info", "--db", built["db"])
    weights = built["description"]["model"]["weights_sha256"]
    assert weights[:12] in result.output
    assert weights not in result.output


@pytest.mark.parametrize("expected", [
    "model", "index settings", "sources", "runs", "tasks", "skipped records", "disk use",
    "saliency.layers", "arithmetic", "budget 25%; selected: math 4 of 14",
])
def test_info_tables_show(built, expected):
    result = invoke_ok("info", "--db", built["db"])
    assert expected in result.output


def test_info_leaves_database_unchanged(built):
    before = file_digest(built["db"])
    invoke_ok("info", "--db", built["db"])
    assert file_digest(built["db"]) == before


def test_info_missing_database_message(tmp_path):
    db = tmp_path / "absent.duckdb"
    result = CliRunner().invoke(cli, ["info", "--db", str(db)])
    assert result.exit_code == 1
    assert f"Error: no trimdb database at {db}" in result.output


def test_info_empty_database_message(tmp_path):
    db = tmp_path / "empty.duckdb"
    Store(db, create=True).close()
    result = invoke_ok("info", "--db", db)
    assert f"{db} contains no index yet; build one with `trimdb index CORPUS --db {db}`" in result.output
