"""The approximate query path: sample summaries, candidates, exact rescoring."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.conftest import POOL, write_jsonl
from trimdb.ann import build_ann
from trimdb.store import Store

LAYERS = ["--layers", "2"]


@pytest.fixture
def indexed(tmp_path, tiny_model_dir, pool_file):
    db = tmp_path / "pool.duckdb"
    result = CliRunner().invoke(cli, ["index", str(pool_file), "--db", str(db), "--model", str(tiny_model_dir),
                                      *LAYERS, "--no-progress"])
    assert result.exit_code == 0, result.output
    return db


def query(db, target, *extra):
    return CliRunner().invoke(cli, ["query", "--db", str(db), "--task", f"math={target}", "--budget", "25%",
                                    *LAYERS, "--no-progress", *extra])


def selection(db, run_id):
    with Store(db, read_only=True) as store:
        return store.query("SELECT sample_key FROM selections WHERE run_id = ? ORDER BY rank", [run_id]).fetchall()


def test_summaries_are_unit_means(indexed):
    build_ann(indexed)
    with Store(indexed, read_only=True) as store:
        first, count = store.query(
            "SELECT min(token_key), count(*) FROM tokens WHERE sample_key = 3").fetchone()
        expected = store.read_token_range(first, count).mean(axis=0)
        import faiss

        index = faiss.read_index(str(store.vectors_dir / "ann.faiss"))
        stored = index.reconstruct(3)
    np.testing.assert_allclose(stored, expected / np.linalg.norm(expected), atol=1e-6)


def test_approximate_with_all_candidates_equals_exact(indexed, target_file):
    assert CliRunner().invoke(cli, ["ann", "--db", str(indexed)]).exit_code == 0
    exact = query(indexed, target_file)
    assert exact.exit_code == 0, exact.output
    approximate = query(indexed, target_file, "--approximate", "--candidates", str(len(POOL)))
    assert approximate.exit_code == 0, approximate.output
    assert selection(indexed, 2) == selection(indexed, 3)
    with Store(indexed, read_only=True) as store:
        scores = store.query(
            "SELECT a.score - b.score FROM scores a JOIN scores b USING (task, sample_key) "
            "WHERE a.run_id = 2 AND b.run_id = 3").fetchall()
    assert len(scores) == len(POOL)
    # Both paths score in float32, over matrices of other shapes, so sums round differently.
    assert max(abs(difference) for (difference,) in scores) < 1e-6


def test_approximate_scores_only_candidates(indexed, target_file):
    build_ann(indexed)
    result = query(indexed, target_file, "--approximate", "--candidates", "4")
    assert result.exit_code == 0, result.output
    with Store(indexed, read_only=True) as store:
        n_scored, = store.query("SELECT count(*) FROM scores WHERE run_id = 2").fetchone()
        n_selected, = store.query("SELECT count(*) FROM selections WHERE run_id = 2").fetchone()
    assert 4 <= n_scored < len(POOL)
    assert n_selected == 3  # 25% of the whole pool of 12, not of the candidates


def test_approximate_without_summary_index(indexed, target_file):
    result = query(indexed, target_file, "--approximate")
    assert result.exit_code == 1
    assert "no sample-summary index" in result.output
    assert "trimdb ann --db" in result.output


def test_stale_summary_index_rejected(indexed, target_file, tiny_model_dir, tmp_path):
    build_ann(indexed)
    extra = write_jsonl(tmp_path / "extra.jsonl", [("A new question?", "A new answer.")])
    result = CliRunner().invoke(cli, ["index", str(extra), "--db", str(indexed), "--model", str(tiny_model_dir),
                                      *LAYERS, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (indexed.parent / f"{indexed.name}.vectors" / "ann.faiss").exists()
    result = query(indexed, target_file, "--approximate")
    assert result.exit_code == 1
    assert "older than the last index run" in result.output


def test_candidates_needs_approximate(indexed, target_file):
    result = query(indexed, target_file, "--candidates", "5")
    assert result.exit_code == 2
    assert "--candidates applies only with --approximate" in result.output


def test_read_tokens_across_segments(tmp_path, tiny_model_dir, pool_file):
    db = tmp_path / "segments.duckdb"
    result = CliRunner().invoke(cli, ["index", str(pool_file), "--db", str(db), "--model", str(tiny_model_dir),
                                      *LAYERS, "--segment-mb", "0.01", "--no-progress"])
    assert result.exit_code == 0, result.output
    with Store(db, read_only=True) as store:
        segments = store.segments()
        assert len(segments) > 2
        keys, vectors = zip(*(chunk for segment in segments for chunk in store.iter_vectors(segment, 1000)))
        keys, vectors = np.concatenate(keys), np.concatenate(vectors)
        # Every third key, then a block that runs over the first segment boundary.
        picked = np.concatenate([np.arange(0, len(keys), 3), np.arange(segments[0].n_vectors - 2, len(keys))])
        picked = np.unique(picked)
        np.testing.assert_array_equal(store.read_tokens(keys[picked]), vectors[picked])
        assert store.read_tokens(keys[:0]).shape == (0, vectors.shape[1])
