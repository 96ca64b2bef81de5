"""Indexing killed at several points resumes to the same index as an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.conftest import POOL, write_jsonl
from trimdb.store import Store

# 96 distinct samples; with 0.02 MB segments (78 tokens of the 64-dimensional tiny model) each
# segment holds two or three samples, so the run commits about 40 segments.
N_SAMPLES = 96
SEGMENT_MB = "0.02"
TIMEOUT = 120


def write_pool(path: Path) -> Path:
    pairs = [(f"{prompt} (case {i})", response) for i in range(N_SAMPLES // len(POOL)) for prompt, response in POOL]
    return write_jsonl(path, pairs)


def index_command(db: Path, model: Path, pool: Path) -> list[str]:
    return ["index", str(pool), "--db", str(db), "--model", str(model), "--layers", "2", "--max-length", "128",
            "--batch-tokens", "256", "--segment-mb", SEGMENT_MB, "--no-progress"]


def index_state(db: Path) -> dict:
    """Return, per sample id, its token rows and vectors, independent of key order."""
    state = {}
    with Store(db, read_only=True) as store:
        rows = store.query(
            "SELECT s.sample_id, min(t.token_key), count(*), list(t.token_class ORDER BY t.position), "
            "list(t.part ORDER BY t.position), list(t.position ORDER BY t.position) "
            "FROM samples s JOIN tokens t USING (sample_key) GROUP BY s.sample_id").fetchall()
        for sample_id, first_key, count, classes, parts, positions in rows:
            state[sample_id] = (classes, parts, positions, store.read_token_range(first_key, count))
        n_vectors = sum(segment.n_vectors for segment in store.segments())
        n_tokens = store.query("SELECT count(*) FROM tokens").fetchone()[0]
    assert n_vectors == n_tokens
    return state


def segment_files(db: Path) -> int:
    folder = Path(f"{db}.vectors")
    return sum(1 for p in folder.iterdir() if p.name.startswith("segment-")) if folder.exists() else 0


def kill_after_segments(db: Path, model: Path, pool: Path, segments: int) -> None:
    """Start `trimdb index` in a subprocess and SIGKILL it once ``segments`` segment files exist."""
    command = [sys.executable, "-c", "from cli.main import main; main()", *index_command(db, model, pool)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=Path(__file__).parent.parent)
    deadline = time.monotonic() + TIMEOUT
    try:
        while segment_files(db) < segments and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=TIMEOUT)
    assert process.returncode == -signal.SIGKILL, "the index run finished before it could be killed"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("reference")
    pool = write_pool(folder / "pool.jsonl")
    db = folder / "pool.duckdb"
    result = CliRunner().invoke(cli, index_command(db, tiny_model_dir, pool))
    assert result.exit_code == 0, result.output
    return pool, index_state(db)


@pytest.mark.parametrize("segments", [1, 5, 17])
def test_index_resumes_after_kill(tmp_path, tiny_model_dir, reference, segments):
    pool, expected = reference
    db = tmp_path / "pool.duckdb"
    kill_after_segments(db, tiny_model_dir, pool, segments)

    result = CliRunner().invoke(cli, index_command(db, tiny_model_dir, pool))
    assert result.exit_code == 0, result.output
    if segments > 1:
        # The kill comes when segment file k exists, so segment k - 1 was committed at least.
        assert "samples were already in the index" in result.output
    state = index_state(db)
    assert set(state) == set(expected)
    for sample_id, (classes, parts, positions, vectors) in state.items():
        assert classes == expected[sample_id][0]
        assert parts == expected[sample_id][1]
        assert positions == expected[sample_id][2]
        # Batches differ between the runs, so float32 rounding differs slightly.
        np.testing.assert_allclose(vectors, expected[sample_id][3], atol=1e-5)


def test_index_rerun_adds_nothing(tmp_path, tiny_model_dir, reference):
    pool, expected = reference
    db = tmp_path / "pool.duckdb"
    runner = CliRunner()
    assert runner.invoke(cli, index_command(db, tiny_model_dir, pool)).exit_code == 0
    files = segment_files(db)
    result = runner.invoke(cli, index_command(db, tiny_model_dir, pool))
    assert result.exit_code == 0, result.output
    assert f"{N_SAMPLES} samples were already in the index" in result.output
    assert segment_files(db) == files
    assert set(index_state(db)) == set(expected)


def test_append_requires_existing_index(tmp_path, tiny_model_dir, reference):
    pool, _ = reference
    db = tmp_path / "missing.duckdb"
    result = CliRunner().invoke(cli, [*index_command(db, tiny_model_dir, pool), "--append"])
    assert result.exit_code == 1
    assert "--append needs an existing index" in result.output
    assert not db.exists()


def test_append_adds_new_samples(tmp_path, tiny_model_dir, reference):
    pool, expected = reference
    db = tmp_path / "pool.duckdb"
    first = write_jsonl(tmp_path / "first.jsonl", POOL[:6])
    runner = CliRunner()
    assert runner.invoke(cli, index_command(db, tiny_model_dir, first)).exit_code == 0
    result = runner.invoke(cli, [*index_command(db, tiny_model_dir, pool), "--append"])
    assert result.exit_code == 0, result.output
    with Store(db, read_only=True) as store:
        n_samples = store.query("SELECT count(*) FROM samples").fetchone()[0]
    assert n_samples == 6 + N_SAMPLES


def test_compact_keeps_scores(tmp_path, tiny_model_dir, reference, target_file):
    pool, expected = reference
    db = tmp_path / "pool.duckdb"
    runner = CliRunner()
    assert runner.invoke(cli, index_command(db, tiny_model_dir, pool)).exit_code == 0
    query = ["query", "--db", str(db), "--task", f"math={target_file}", "--budget", "10%", "--layers", "2",
             "--no-progress"]
    assert runner.invoke(cli, query).exit_code == 0
    before = segment_files(db)

    result = runner.invoke(cli, ["compact", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert segment_files(db) == 1 < before
    assert runner.invoke(cli, query).exit_code == 0
    with Store(db, read_only=True) as store:
        scores = store.query("SELECT run_id, sample_key, score FROM scores ORDER BY run_id, sample_key").fetchall()
    first = [(key, score) for run, key, score in scores if run == 2]
    second = [(key, score) for run, key, score in scores if run == 3]
    assert first == second
    state = index_state(db)
    for sample_id, (_, _, _, vectors) in state.items():
        np.testing.assert_array_equal(vectors, expected[sample_id][3])


def test_index_rejects_full_disk(tmp_path, tiny_model_dir, reference, monkeypatch):
    pool, _ = reference
    db = tmp_path / "pool.duckdb"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    result = CliRunner().invoke(cli, index_command(db, tiny_model_dir, pool))
    assert result.exit_code == 1
    assert "not enough disk space" in result.output
    assert "GB are free" in result.output
    assert not db.exists()


def test_merge_shards_equals_single_index(tmp_path, tiny_model_dir, reference):
    pool, expected = reference
    lines = pool.read_text().splitlines()
    # Two shards that overlap in 10 samples, indexed separately as on two machines.
    shard_a = tmp_path / "a.jsonl"
    shard_b = tmp_path / "b.jsonl"
    shard_a.write_text("\n".join(lines[:55]) + "\n")
    shard_b.write_text("\n".join(lines[45:]) + "\n")
    runner = CliRunner()
    for shard in (shard_a, shard_b):
        result = runner.invoke(cli, index_command(tmp_path / f"{shard.stem}.duckdb", tiny_model_dir, shard))
        assert result.exit_code == 0, result.output

    merged = tmp_path / "merged.duckdb"
    result = runner.invoke(cli, ["merge", "--db", str(merged), str(tmp_path / "a.duckdb"), str(tmp_path / "b.duckdb")])
    assert result.exit_code == 0, result.output
    assert "10 were already in" in result.output
    state = index_state(merged)
    assert set(state) == set(expected)
    for sample_id, (classes, parts, positions, vectors) in state.items():
        assert classes == expected[sample_id][0]
        assert positions == expected[sample_id][2]
        np.testing.assert_allclose(vectors, expected[sample_id][3], atol=1e-5)

    again = runner.invoke(cli, ["merge", "--db", str(merged), str(tmp_path / "b.duckdb")])
    assert again.exit_code == 0, again.output
    assert "merged 0 samples" in again.output


def test_merge_rejects_other_model(tmp_path, tiny_model_dir, reference):
    from tests.tiny import save_tiny_model

    pool, _ = reference
    other_model = save_tiny_model(tmp_path / "other", seed=1)
    runner = CliRunner()
    assert runner.invoke(cli, index_command(tmp_path / "a.duckdb", tiny_model_dir, pool)).exit_code == 0
    assert runner.invoke(cli, index_command(tmp_path / "b.duckdb", other_model, pool)).exit_code == 0
    result = runner.invoke(cli, ["merge", "--db", str(tmp_path / "a.duckdb"), str(tmp_path / "b.duckdb")])
    assert result.exit_code == 1
    assert "weights_sha256" in result.output
