"""Baselines of `trimdb query --method`: random, bm25 and embedding write the same tables as TRIM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli.main import cli
from tests.conftest import POOL, TARGETS, write_jsonl
from trimdb.baselines import BaselinePool, iter_sample_means, record_text
from trimdb.errors import SettingsError
from trimdb.indexing import index_corpus
from trimdb.query import query_tasks
from trimdb.records import read_samples
from trimdb.render import PROMPT, RESPONSE, TEMPLATE, Renderer
from trimdb.settings import IndexSettings, SaliencySettings
from trimdb.store import Store

TINY_INDEX = IndexSettings(max_length=128, batch_tokens=256, saliency=SaliencySettings(layers=2))
BASELINES = ["random", "bm25", "embedding"]
# The pool contains one target sample verbatim and one case-and-space variant of a pool sample.
IDENTICAL = TARGETS[1]
DUPLICATE = ("what is the capital of FRANCE?", "The capital of  France is Paris.")
N_POOL = len(POOL) + 2
# Stored vectors come from padded batches and the reference runs one sample alone, both in
# float32, so the means differ by float32 rounding only.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_model_dir):
    """Index the pool once; every test adds query runs and reads only its own run."""
    folder = tmp_path_factory.mktemp("baselines")
    pool = write_jsonl(folder / "pool.jsonl", POOL + [IDENTICAL, DUPLICATE])
    targets = folder / "targets"
    targets.mkdir()
    write_jsonl(targets / "math.jsonl", TARGETS)
    write_jsonl(targets / "geo.jsonl", [("What is the capital of Spain?", "Madrid.")])
    db = folder / "pool.duckdb"
    index_corpus(db, [pool], model=str(tiny_model_dir), settings=TINY_INDEX, progress=False)
    return {"db": db, "pool": pool, "targets": targets, "math": targets / "math.jsonl", "model": tiny_model_dir}


def run_rows(db, sql: str, run_id: int) -> list[tuple]:
    with Store(db, read_only=True) as store:
        return store.query(sql, [run_id]).fetchall()


def ranked_ids(db, run_id: int) -> list[str]:
    return [row[0] for row in run_rows(db, "SELECT sample_id FROM scored WHERE run_id = ? ORDER BY rank", run_id)]


@pytest.fixture(scope="module")
def pool_samples(indexed):
    return {(s.messages[0].content, s.messages[1].content): s for s in read_samples(indexed["pool"])}


# Each method --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", BASELINES)
def test_method_writes_scores_and_selections(indexed, method):
    result = query_tasks(indexed["db"], {"math": indexed["math"]}, "25%", method=method, progress=False)
    db, run_id = indexed["db"], result.run_id

    scores = run_rows(db, "SELECT score, mean_part, max_part, unseen_share, n_tokens FROM scores WHERE run_id = ?", run_id)
    selected = run_rows(db, "SELECT rank FROM selections WHERE run_id = ? ORDER BY rank", run_id)
    task = run_rows(db, "SELECT n_targets, n_fingerprints, n_scored, n_selected FROM tasks WHERE run_id = ?", run_id)
    fingerprints = run_rows(db, "SELECT count(*) FROM fingerprints WHERE run_id = ?", run_id)
    settings = json.loads(run_rows(db, "SELECT settings FROM runs WHERE run_id = ?", run_id)[0][0])
    assert len(scores) == N_POOL
    assert [rank for rank, in selected] == [1, 2, 3, 4]
    assert task == [(3, 0, N_POOL, 4)]
    assert fingerprints == [(0,)]
    assert settings["method"] == method
    assert all(np.isfinite(row[:4]).all() and row[3] == 0 and row[4] > 0 for row in scores)
    assert all(row[2] == row[0] for row in scores)


def test_random_same_seed_same_ranking(indexed):
    first = query_tasks(indexed["db"], {"math": indexed["math"]}, 3, method="random", seed=7, progress=False)
    second = query_tasks(indexed["db"], {"math": indexed["math"]}, 3, method="random", seed=7, progress=False)
    assert ranked_ids(indexed["db"], first.run_id) == ranked_ids(indexed["db"], second.run_id)


def test_random_seeds_differ(indexed):
    rankings = [ranked_ids(indexed["db"], query_tasks(indexed["db"], {"math": indexed["math"]}, 3, method="random",
                                                      seed=seed, progress=False).run_id) for seed in (0, 1)]
    assert rankings[0] != rankings[1]
    assert sorted(rankings[0]) == sorted(rankings[1])


def test_random_seed_stored(indexed):
    result = query_tasks(indexed["db"], {"math": indexed["math"]}, 3, method="random", seed=5, progress=False)
    settings = json.loads(run_rows(indexed["db"], "SELECT settings FROM runs WHERE run_id = ?", result.run_id)[0][0])
    assert settings["seed"] == 5


@pytest.mark.parametrize("method", ["bm25", "embedding"])
def test_identical_sample_ranks_first(indexed, pool_samples, method):
    result = query_tasks(indexed["db"], {"math": indexed["math"]}, 3, method=method, progress=False)
    assert ranked_ids(indexed["db"], result.run_id)[0] == pool_samples[IDENTICAL].sample_id


def test_embedding_identical_sample_cosine_one(indexed, pool_samples):
    result = query_tasks(indexed["db"], {"math": indexed["math"]}, 3, method="embedding", progress=False)
    (score,), = run_rows(indexed["db"], "SELECT score FROM scored WHERE run_id = ? AND rank = 1", result.run_id)
    assert score == pytest.approx(1.0, abs=TOLERANCE)


def test_where_limits_baseline(indexed):
    where = "n_tokens < 30"
    result = query_tasks(indexed["db"], {"math": indexed["math"]}, "100%", method="bm25", where=where, progress=False)
    with Store(indexed["db"], read_only=True) as store:
        kept = {row[0] for row in store.query(f"SELECT sample_id FROM sample_info WHERE {where}").fetchall()}
    assert 0 < len(kept) < N_POOL
    assert set(ranked_ids(indexed["db"], result.run_id)) == kept


# Embedding pool side against the model ----------------------------------------------------------


def reference_means(model_dir, samples, parts) -> dict[str, np.ndarray]:
    """Embed each sample alone with the tiny model: the unit mean of its unit in-scope hidden states."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    renderer = Renderer(tokenizer, max_length=TINY_INDEX.max_length)
    means = {}
    for sample in samples:
        rendered = renderer.render(sample.messages)
        with torch.inference_mode():
            hidden = model.get_decoder()(input_ids=torch.tensor([rendered.input_ids])).last_hidden_state[0]
        unit = torch.nn.functional.normalize(hidden.float(), dim=-1).numpy().astype(np.float64)
        mean = unit[np.isin(np.asarray(rendered.parts), parts)].mean(axis=0)
        means[sample.sample_id] = mean / np.linalg.norm(mean)
    return means


@pytest.mark.parametrize("parts, chunk", [
    ((PROMPT, RESPONSE), 65_536),
    ((PROMPT, RESPONSE), 7),
    ((RESPONSE,), 5),
], ids=["all-one-chunk", "all-chunks-of-7", "response-chunks-of-5"])
def test_pool_means_match_model(indexed, pool_samples, parts, chunk):
    expected = reference_means(indexed["model"], pool_samples.values(), parts)
    with Store(indexed["db"], read_only=True) as store:
        rows = store.query("SELECT sample_key, sample_id FROM samples ORDER BY sample_key").fetchall()
        keys = np.array([key for key, _ in rows], dtype=np.int64)
        pool = BaselinePool(store, keys, np.ones(len(keys), dtype=bool), parts)
        found = {rows[slot][1]: mean for slots, means, _ in iter_sample_means(pool, pool.allowed, chunk)
                 for slot, mean in zip(slots, means)}
    assert TEMPLATE not in parts
    assert sorted(found) == sorted(expected)
    for sample_id, mean in found.items():
        np.testing.assert_allclose(mean, expected[sample_id], atol=TOLERANCE)


# BM25 text of stored records -------------------------------------------------------------------


MESSAGES = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}]}


@pytest.mark.parametrize("record, index_format, roles, expected", [
    (MESSAGES, None, {"system", "user", "assistant"}, ("Be brief.\nHi\nHello", True)),
    (MESSAGES, None, {"assistant"}, ("Hello", True)),
    (MESSAGES, None, {"system", "user"}, ("Be brief.\nHi", True)),
    ({"instruction": "Add", "input": "1 and 2", "output": "3"}, None, {"user", "assistant"}, ("Add\n\n1 and 2\n3", True)),
    ({"messages": "broken", "instruction": "Add", "output": "3"}, "alpaca", {"user", "assistant"}, ("Add\n3", True)),
    ({"question": "Why?", "meta": {"tags": ["a", 1]}}, None, {"user"}, ("Why?\na", False)),
], ids=["messages-all", "messages-response", "messages-prompt", "alpaca", "index-format", "undetected"])
def test_record_text(record, index_format, roles, expected):
    assert record_text(record, index_format, roles, "pool.jsonl", 1) == expected


# CLI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", BASELINES)
def test_cli_method_two_tasks_with_dedup(indexed, method):
    db = indexed["db"]
    result = CliRunner().invoke(cli, ["query", "--db", str(db), "--task", str(indexed["targets"]), "--budget", "100%",
                                      "--method", method, "--dedup", "exact", "--split", "math=3,geo=1", "--no-progress"])
    assert result.exit_code == 0, result.output

    with Store(db, read_only=True) as store:
        run_id = store.query("SELECT max(run_id) FROM runs").fetchone()[0]
        settings = json.loads(store.query("SELECT settings FROM runs WHERE run_id = ?", [run_id]).fetchone()[0])
        tasks = store.query("SELECT task, n_selected FROM tasks WHERE run_id = ? ORDER BY task", [run_id]).fetchall()
        combined = store.query("SELECT count(DISTINCT sample_key) FROM coresets WHERE run_id = ?", [run_id]).fetchone()
        removed = store.query("SELECT task, reason FROM removed WHERE run_id = ? ORDER BY task NULLS FIRST",
                              [run_id]).fetchall()
    assert settings["method"] == method
    assert tasks == [("geo", N_POOL - 1), ("math", N_POOL - 1)]
    assert combined == (N_POOL - 1,)
    assert removed == [(None, "exact"), ("geo", "exact"), ("math", "exact")]
    assert f"task geo: {N_POOL - 1} of {N_POOL} samples selected (1 targets)" in result.output


@pytest.mark.parametrize("arguments, message", [
    (["--method", "tfidf"], "Invalid value for '--method'"),
    (["--method", "bm25", "--seed", "3"], "--seed applies only with --method random"),
    (["--method", "bm25", "--approximate"], "--approximate scores TRIM candidates only"),
    (["--method", "random", "--seed", "-1"], "Invalid value for '--seed'"),
], ids=["unknown-method", "seed-without-random", "approximate-baseline", "negative-seed"])
def test_cli_rejects(indexed, arguments, message):
    result = CliRunner().invoke(cli, ["query", "--db", str(indexed["db"]), "--task", f"math={indexed['math']}",
                                      "--budget", "3", "--no-progress", *arguments])
    assert result.exit_code != 0
    assert message in result.output


def test_query_rejects_unknown_method(indexed):
    with pytest.raises(SettingsError, match="unknown selection method 'tfidf': expected one of trim, random"):
        query_tasks(indexed["db"], {"math": indexed["math"]}, 3, method="tfidf", progress=False)
