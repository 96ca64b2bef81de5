"""The less baseline: LoRA gradient features, their random projection, and `trimdb query --method less`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from tests.conftest import POOL, TARGETS, write_jsonl
from trimdb.indexing import index_corpus
from trimdb.less import (
    PROJECTION_CHUNK_ROWS, GradientFeaturizer, less_scores, rademacher_project, response_loss, unit_rows,
)
from trimdb.models import load_model
from trimdb.records import read_samples
from trimdb.render import RESPONSE, Renderer
from trimdb.settings import IndexSettings, SaliencySettings
from trimdb.store import Store

TINY_INDEX = IndexSettings(max_length=128, batch_tokens=256, saliency=SaliencySettings(layers=2))
K = 8192
# The inner product of two unit vectors after a k-dimensional Rademacher projection has a standard
# deviation of at most sqrt(2 / k), 0.016 at k = 8192, so 0.1 is more than 6 standard deviations.
COSINE_TOLERANCE = 0.1
IDENTICAL = TARGETS[1]
N_POOL = len(POOL) + 1


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def renderer(loaded):
    return Renderer(loaded.tokenizer, max_length=TINY_INDEX.max_length)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("less") / "math.jsonl", TARGETS)
    return list(read_samples(path, source="math"))


def rendered_pool(renderer, pairs):
    messages = [({"role": "user", "content": p}, {"role": "assistant", "content": r}) for p, r in pairs]
    return [renderer.render(m) for m in messages]


@pytest.fixture(scope="module")
def seeded_runs(loaded, renderer):
    """Return (gradients (3, P), features (3, K)) of three pool samples for runs with seeds 0, 0 and 1."""
    samples = rendered_pool(renderer, POOL[:3])
    runs = []
    for seed in (0, 0, 1):
        with GradientFeaturizer(loaded, projection_dim=K, seed=seed) as featurizer:
            gradients = featurizer.gradients(samples)
            runs.append((gradients, featurizer.project(gradients)))
    return runs


def test_features_same_seed_equal(seeded_runs):
    np.testing.assert_array_equal(seeded_runs[0][1], seeded_runs[1][1])


def test_features_seeds_differ(seeded_runs):
    assert not np.allclose(seeded_runs[0][1], seeded_runs[2][1], atol=1e-3)


def test_projection_preserves_cosines(seeded_runs):
    gradients, projected = seeded_runs[0]
    unprojected = unit_rows(gradients.numpy().astype(np.float64))
    exact = unprojected @ unprojected.T
    approximate = projected @ projected.T
    assert np.abs(exact - np.eye(3)).max() > 0.05  # the three gradients are not all orthogonal
    np.testing.assert_allclose(approximate, exact, atol=COSINE_TOLERANCE)


def test_rademacher_entries_and_chunks():
    n_parameters = 2 * PROJECTION_CHUNK_ROWS + 5  # three chunks, the last one partial
    rows = torch.eye(n_parameters)[[0, PROJECTION_CHUNK_ROWS, n_parameters - 1]]
    matrix_rows = rademacher_project(rows, 64, seed=0)  # rows of R (P, 64)
    assert set(np.unique(matrix_rows.numpy() * 8).tolist()) == {-1.0, 1.0}
    batch = torch.randn(4, n_parameters, generator=torch.Generator().manual_seed(0))
    one_by_one = torch.cat([rademacher_project(batch[i:i + 1], 64, seed=0) for i in range(4)])
    np.testing.assert_allclose(rademacher_project(batch, 64, seed=0).numpy(), one_by_one.numpy(), atol=1e-4)


def test_response_loss_matches_model_loss(loaded, renderer):
    rendered = renderer.render(({"role": "user", "content": POOL[1][0]}, {"role": "assistant", "content": POOL[1][1]}))
    labels = [t if part == RESPONSE else -100 for t, part in zip(rendered.input_ids, rendered.parts)]
    with torch.no_grad():
        expected = loaded.model(input_ids=torch.tensor([rendered.input_ids]), labels=torch.tensor([labels])).loss
        actual = response_loss(loaded.model, rendered)
    assert float(actual) == pytest.approx(float(expected), rel=1e-5)


def test_featurizer_leaves_model_unchanged(loaded, renderer):
    input_ids = torch.tensor([renderer.render(({"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello"})).input_ids])
    with torch.no_grad():
        before = loaded.model(input_ids=input_ids).logits
    with GradientFeaturizer(loaded, projection_dim=64) as featurizer:
        featurizer.features(rendered_pool(renderer, POOL[:1]))
    with torch.no_grad():
        after = loaded.model(input_ids=input_ids).logits
    assert not any("lora" in name for name, _ in loaded.model.named_modules())
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_identical_target_scores_highest(loaded, renderer, targets):
    pairs = POOL + [IDENTICAL]
    pool = [(key, ({"role": "user", "content": p}, {"role": "assistant", "content": r}))
            for key, (p, r) in enumerate(pairs)]
    scores = less_scores(loaded, renderer, pool, {"math": targets}, projection_dim=K, progress=False)
    best = int(np.argmax(scores.max_cosine["math"]))
    assert scores.keys.tolist() == list(range(N_POOL))
    assert best == N_POOL - 1
    assert scores.max_cosine["math"][best] == pytest.approx(1.0, abs=1e-5)
    assert scores.n_target_tokens["math"] > 0


def test_less_scores_rejects_task_without_targets(loaded, renderer, targets):
    with pytest.raises(ValueError, match=r"every task needs at least one target sample; tasks without one: \['geo'\]"):
        less_scores(loaded, renderer, [], {"math": targets, "geo": []}, progress=False)


# Query and CLI ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("less-index")
    pool = write_jsonl(folder / "pool.jsonl", POOL + [IDENTICAL])
    math = write_jsonl(folder / "math.jsonl", TARGETS)
    db = folder / "pool.duckdb"
    index_corpus(db, [pool], model=str(tiny_model_dir), settings=TINY_INDEX, progress=False)
    return {"db": db, "math": math}


def test_cli_less_writes_scores_and_selections(indexed):
    db = indexed["db"]
    result = CliRunner().invoke(cli, ["query", "--db", str(db), "--task", f"math={indexed['math']}", "--budget", "25%",
                                      "--method", "less", "--seed", "2", "--no-progress"])
    assert result.exit_code == 0, result.output

    with Store(db, read_only=True) as store:
        run_id = store.query("SELECT max(run_id) FROM runs").fetchone()[0]
        settings, stats = store.query("SELECT settings, stats FROM runs WHERE run_id = ?", [run_id]).fetchone()
        n_scores = store.query("SELECT count(*) FROM scores WHERE run_id = ?", [run_id]).fetchone()[0]
        ranks = store.query("SELECT rank FROM selections WHERE run_id = ? ORDER BY rank", [run_id]).fetchall()
        top = store.query("SELECT record, score FROM scored WHERE run_id = ? AND rank = 1", [run_id]).fetchone()
    settings, cost = json.loads(settings), json.loads(stats)["cost"]
    assert settings["method"] == "less"
    assert (settings["seed"], settings["projection_dim"], settings["lora_rank"]) == (2, K, 8)
    assert n_scores == N_POOL
    assert [rank for rank, in ranks] == [1, 2, 3, 4]
    assert json.loads(top[0])["messages"][0]["content"] == IDENTICAL[0]
    assert top[1] == pytest.approx(1.0, abs=1e-5)
    assert cost["n_pool_samples"] == N_POOL
    assert cost["n_lora_gradient_entries"] == 2 * 8 * (64 + 32 + 32 + 64)  # layers x rank x output sizes
    assert cost["flops_projection"] == 2 * cost["n_lora_gradient_entries"] * K * (N_POOL + len(TARGETS))
    assert cost["flops"] > cost["flops_projection"]
    assert cost["seconds"] > 0
