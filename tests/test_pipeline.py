"""index + query on a tiny random-weight Llama against exact TRIM computed in memory."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from trimdb.indexing import index_corpus
from trimdb.query import query_tasks
from trimdb.records import read_samples
from trimdb.reference import reference_scores
from trimdb.render import Renderer
from trimdb.settings import IndexSettings, SaliencySettings, ScoreSettings
from trimdb.store import Store

# Scores are float32 dot products of unit vectors summed in float64; the reference runs each
# sample alone (no padding) in float32, so hidden states differ by float32 rounding only.
TOLERANCE = 1e-5
TINY_INDEX = IndexSettings(max_length=128, batch_tokens=256, saliency=SaliencySettings(layers=2))


def stored_scores(db, run_id, task):
    with Store(db, read_only=True) as store:
        rows = store.query(
            "SELECT sample_id, score, mean_part, max_part, unseen_share, n_scored_tokens, rank, selected FROM scored "
            "WHERE run_id = ? AND task = ? ORDER BY rank", [run_id, task]).fetchall()
    return rows


def reference_for(model_dir, pool_file, target_file, settings):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    renderer = Renderer(tokenizer, max_length=TINY_INDEX.max_length)
    pool = list(read_samples(pool_file))
    targets = list(read_samples(target_file))
    return reference_scores(model, renderer, pool, targets, settings)


@pytest.mark.parametrize("settings", [
    ScoreSettings(saliency=SaliencySettings(layers=2)),
    ScoreSettings(saliency=SaliencySettings(layers=1, row_saliency="inverse"), scope="response",
                  unseen_penalty=0.8, mean_weight=0.3, max_weight=0.7),
    ScoreSettings(saliency=SaliencySettings(layers=2, row_weight=1.0, column_weight=0.0), scope="prompt"),
], ids=["defaults", "inverse-response", "row-only-prompt"])
def test_query_matches_reference(tmp_path, tiny_model_dir, pool_file, target_file, settings):
    db = tmp_path / "pool.duckdb"
    index_corpus(db, [pool_file], model=str(tiny_model_dir), settings=TINY_INDEX, progress=False)
    result = query_tasks(db, {"math": target_file}, "25%", settings=settings, model=str(tiny_model_dir), progress=False)
    rows = stored_scores(db, result.run_id, "math")
    expected = reference_for(tiny_model_dir, pool_file, target_file, settings)

    assert len(rows) == len(expected)
    for sample_id, score, mean_part, max_part, unseen_share, n_tokens, _, _ in rows:
        assert score == pytest.approx(expected[sample_id][0], abs=TOLERANCE)
        assert mean_part == pytest.approx(expected[sample_id][1], abs=TOLERANCE)
        assert max_part == pytest.approx(expected[sample_id][2], abs=TOLERANCE)
        assert unseen_share == pytest.approx(expected[sample_id][3])
        assert n_tokens == expected[sample_id][4]

    ranking = sorted(expected, key=lambda sample_id: (-expected[sample_id][0], sample_id))
    selected = [row[0] for row in rows if row[7]]
    assert selected == ranking[:3]


def test_query_without_model_uses_index_model(tmp_path, tiny_model_dir, pool_file, target_file):
    db = tmp_path / "pool.duckdb"
    index_corpus(db, [pool_file], model=str(tiny_model_dir), settings=TINY_INDEX, progress=False)
    result = query_tasks(db, {"math": target_file}, 2, settings=ScoreSettings(saliency=SaliencySettings(layers=2)),
                         progress=False)
    assert result.tasks[0].n_selected == 2
    assert result.tasks[0].n_scored == 12


def test_index_batching_does_not_change_vectors(tmp_path, tiny_model_dir, pool_file):
    one, many = tmp_path / "one.duckdb", tmp_path / "many.duckdb"
    index_corpus(one, [pool_file], model=str(tiny_model_dir), progress=False,
                 settings=IndexSettings(max_length=128, batch_tokens=128, saliency=SaliencySettings(layers=2)))
    index_corpus(many, [pool_file], model=str(tiny_model_dir), settings=TINY_INDEX, progress=False)
    vectors = []
    for db in (one, many):
        with Store(db, read_only=True) as store:
            segment = store.segments()[0]
            (_, stored), = store.iter_vectors(segment, chunk=segment.n_vectors)
            vectors.append(stored)
            saliency = store.query("SELECT saliency FROM tokens ORDER BY token_key").fetchnumpy()["saliency"]
            vectors.append(np.asarray(saliency))
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-5)
    # Saliency is min-max normalized per sample; the random model's attention is nearly uniform,
    # so the range is small and float32 rounding of padded batches grows to about 5e-4.
    np.testing.assert_allclose(vectors[1], vectors[3], atol=2e-3)


def test_query_where_restricts_scan(tmp_path, tiny_model_dir, pool_file, target_file):
    db = tmp_path / "pool.duckdb"
    index_corpus(db, [pool_file], model=str(tiny_model_dir), settings=TINY_INDEX, progress=False)
    settings = ScoreSettings(saliency=SaliencySettings(layers=2))
    full = query_tasks(db, {"math": target_file}, "100%", settings=settings, progress=False)
    where = "n_tokens < 30"
    part = query_tasks(db, {"math": target_file}, "50%", settings=settings, where=where, progress=False)

    with Store(db, read_only=True) as store:
        kept = {row[0] for row in store.query(f"SELECT sample_id FROM sample_info WHERE {where}").fetchall()}
        scored = dict(store.query("SELECT sample_id, score FROM scored WHERE run_id = ?", [part.run_id]).fetchall())
        reference = dict(store.query("SELECT sample_id, score FROM scored WHERE run_id = ?", [full.run_id]).fetchall())
    assert 0 < len(kept) < 12
    assert set(scored) == kept
    for sample_id, score in scored.items():
        assert score == pytest.approx(reference[sample_id], abs=1e-12)
    assert part.tasks[0].n_selected == -(-len(kept) // 2)
