"""Budget split, round-robin combination and deduplication of coresets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.conftest import POOL, TARGETS, write_jsonl
from trimdb.errors import SettingsError
from trimdb.records import Message
from trimdb.selection import (
    Deduplicator, combine_rankings, normalized_text_hash, parse_split, select_ranked, split_budget,
)
from trimdb.store import Store


@pytest.mark.parametrize("split, counts, total, expected", [
    ("equal", {"a": 5, "b": 8}, 10, {"a": 5, "b": 5}),
    ("equal", {"a": 5, "b": 8, "c": 1}, 10, {"a": 4, "b": 3, "c": 3}),
    ("proportional", {"a": 2, "b": 6}, 8, {"a": 2, "b": 6}),
    ({"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 1, "b": 1, "c": 1}, 7, {"a": 4, "b": 2, "c": 1}),
    ({"a": 1.0, "b": 0.0}, {"a": 1, "b": 1}, 3, {"a": 3, "b": 0}),
])
def test_split_budget(split, counts, total, expected):
    quotas = split_budget(total, split, counts)
    assert quotas == expected
    assert sum(quotas.values()) == total


@pytest.mark.parametrize("text, message", [
    ("a=x", "invalid --split item"),
    ("a=0.5", "no weight for task"),
    ("a=0.5,z=0.5", "not a --task"),
    ("a=0,b=0", "must not all be 0"),
    ("fair", "invalid --split item"),
])
def test_parse_split_rejects(text, message):
    with pytest.raises(SettingsError, match=message):
        parse_split(text, ["a", "b"])


def test_parse_split_weights():
    assert parse_split("a=2,b=1", ["a", "b"]) == {"a": 2.0, "b": 1.0}
    assert parse_split("proportional", ["a"]) == "proportional"


def test_round_robin_skips_taken_samples():
    rankings = {"a": np.array([0, 1, 2, 3]), "b": np.array([0, 4, 1, 5])}
    picks, removed = combine_rankings(rankings, {"a": 2, "b": 2}, None)
    assert [(p.index, p.task, p.task_rank) for p in picks] == [(0, "a", 1), (4, "b", 2), (1, "a", 2), (5, "b", 4)]
    assert removed == []


def test_exhausted_task_passes_its_quota():
    rankings = {"a": np.array([0]), "b": np.array([1, 2, 3])}
    picks, _ = combine_rankings(rankings, {"a": 2, "b": 2}, None)
    assert [p.index for p in picks] == [0, 1, 2, 3]


def test_exact_dedup_refills_from_ranking():
    dedup = Deduplicator(text_hashes=["h1", "h2", "h1", "h3"])
    chosen, removed = select_ranked(np.array([0, 2, 1, 3]), 3, dedup)
    assert chosen == [0, 1, 3]
    assert [(r.index, r.reason, r.duplicate_of) for r in removed] == [(2, "exact", 0)]


def test_near_dedup_uses_threshold():
    vectors = np.array([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0]])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    dedup = Deduplicator(near_threshold=0.98, embedding=lambda slot: vectors[slot])
    chosen, removed = select_ranked(np.array([0, 1, 2]), 3, dedup)
    assert chosen == [0, 2]
    assert removed[0].reason == "near"
    assert removed[0].similarity == pytest.approx(0.99, abs=1e-3)


def test_text_hash_normalizes_case_and_space():
    first = [Message("user", "What  is\nX?"), Message("assistant", "Y")]
    second = [Message("user", "what is x?"), Message("assistant", " y ")]
    assert normalized_text_hash(first) == normalized_text_hash(second)
    assert normalized_text_hash(first) != normalized_text_hash([Message("user", "what is x?"), Message("assistant", "z")])


def test_query_two_tasks_with_dedup(tmp_path, tiny_model_dir):
    pool = POOL + [("what is the capital of FRANCE?", "The capital of  France is Paris.")]
    write_jsonl(tmp_path / "pool.jsonl", pool)
    targets = tmp_path / "targets"
    targets.mkdir()
    write_jsonl(targets / "math.jsonl", TARGETS)
    write_jsonl(targets / "geo.jsonl", [("What is the capital of Spain?", "Madrid.")])
    db = tmp_path / "pool.duckdb"
    runner = CliRunner()
    result = runner.invoke(cli, ["index", str(tmp_path / "pool.jsonl"), "--db", str(db), "--model", str(tiny_model_dir),
                                 "--layers", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["query", "--db", str(db), "--task", str(targets), "--budget", "50%", "--layers", "2",
                                 "--dedup", "exact", "--split", "math=3,geo=1", "--no-progress"])
    assert result.exit_code == 0, result.output

    with Store(db, read_only=True) as store:
        tasks = store.query("SELECT task, n_selected FROM tasks ORDER BY task").fetchall()
        combined = store.query("SELECT task, count(*) FROM combined GROUP BY task ORDER BY task").fetchall()
        keys = store.query("SELECT sample_key FROM coresets").fetchall()
        removed = store.query("SELECT task, reason FROM removed ORDER BY task NULLS FIRST").fetchall()
        settings = json.loads(store.query("SELECT settings FROM runs WHERE kind = 'query'").fetchone()[0])
    assert tasks == [("geo", 7), ("math", 7)]
    assert combined == [("geo", 2), ("math", 5)]
    assert len(set(keys)) == 7
    assert ("geo", "exact") in removed
    assert settings["split"] == {"math": 3.0, "geo": 1.0}
    assert settings["exact_dedup"] is True
    assert "combined coreset: 7 samples" in result.output
