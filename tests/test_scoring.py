"""Fingerprints, token scores, pooling and ranking on small hand-made vectors."""

from __future__ import annotations

import numpy as np
import pytest

from trimdb.errors import SettingsError
from trimdb.fingerprints import build_fingerprints
from trimdb.scoring import SampleAccumulator, rank_samples, score_tokens
from trimdb.settings import budget_size, parse_budget

E1, E2, E3 = np.eye(3, dtype=np.float32)


def test_fingerprint_is_weighted_unit_sum():
    fingerprints = build_fingerprints([np.array([7, 7, 9])], [np.stack([E1, E2, E3])], [np.array([1.0, 3.0, 0.5])])
    assert fingerprints.classes.tolist() == [7, 9]
    expected = (E1 + 3 * E2) / np.linalg.norm(E1 + 3 * E2)
    np.testing.assert_allclose(fingerprints.vectors[0], expected, rtol=1e-6)
    np.testing.assert_allclose(fingerprints.vectors[1], E3)
    assert fingerprints.occurrences.tolist() == [2, 1]
    assert fingerprints.saliency_sums.tolist() == pytest.approx([4.0, 0.5])


def test_fingerprint_with_zero_saliency_is_dropped():
    fingerprints = build_fingerprints([np.array([1, 2])], [np.stack([E1, E2])], [np.array([0.0, 1.0])])
    assert fingerprints.classes.tolist() == [2]


def test_fingerprints_pool_across_samples():
    fingerprints = build_fingerprints(
        [np.array([5]), np.array([5])], [E1[None], E2[None]], [np.array([1.0]), np.array([1.0])]
    )
    np.testing.assert_allclose(fingerprints.vectors[0], (E1 + E2) / np.sqrt(2), rtol=1e-6)


def test_unseen_class_takes_penalized_nearest():
    fingerprints = build_fingerprints([np.array([1, 2])], [np.stack([E1, E2])], [np.ones(2)])
    vectors = np.stack([E1, (E1 + E2) / np.sqrt(2), E3])
    scores, unseen = score_tokens(vectors, np.array([2, 99, 1]), fingerprints, unseen_penalty=0.5)
    assert scores.tolist() == pytest.approx([0.0, 0.5 / np.sqrt(2), 0.0])
    assert unseen.tolist() == [False, True, False]


def test_score_tokens_full_product_for_unseen_only():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    classes = rng.integers(0, 40, size=3000)
    fingerprints = build_fingerprints([classes[:500] % 20], [vectors[:500]], [rng.random(500)])
    products = []

    def matmul(a, b):
        products.append(len(a))
        return a @ b.T

    fast, fast_unseen = score_tokens(vectors, classes, fingerprints, 0.5, matmul=matmul)
    full, full_unseen = score_tokens(vectors, classes, fingerprints, 0.5,
                                     similarities=vectors @ fingerprints.vectors.T)
    np.testing.assert_allclose(fast, full, atol=1e-6)
    assert fast_unseen.tolist() == full_unseen.tolist()
    assert products == [int(full_unseen.sum())]


def test_accumulator_pools_mean_and_max_across_chunks():
    accumulator = SampleAccumulator(3)
    accumulator.add(np.array([0, 0, 1]), np.array([0.2, 0.6, 0.5]), np.array([False, True, False]))
    accumulator.add(np.array([0]), np.array([0.1]), np.array([True]))
    result = accumulator.finish(mean_weight=0.5, max_weight=0.5)
    assert result.mean_part[:2].tolist() == pytest.approx([0.3, 0.5])
    assert result.max_part[:2].tolist() == pytest.approx([0.6, 0.5])
    assert result.score[:2].tolist() == pytest.approx([0.45, 0.5])
    assert result.unseen_share[:2].tolist() == pytest.approx([2 / 3, 0.0])
    assert result.count.tolist() == [3, 1, 0]
    assert np.isnan(result.score[2])


def test_rank_breaks_ties_by_sample_id():
    scores = np.array([0.5, 0.9, 0.5, np.nan, 0.5])
    sample_ids = np.array(["c", "z", "a", "b", "b"], dtype=object)
    assert rank_samples(scores, sample_ids).tolist() == [1, 2, 4, 0]


@pytest.mark.parametrize("text, pool, expected", [
    ("5%", 1000, 50), ("5%", 999, 50), ("100%", 7, 7), ("0.1%", 10, 1), ("200", 1000, 200), ("200", 50, 50),
])
def test_budget_size(text, pool, expected):
    assert budget_size(parse_budget(text), pool) == expected


@pytest.mark.parametrize("text", ["0", "0%", "150%", "-3", "abc", "5.5", ""])
def test_invalid_budget_is_rejected(text):
    with pytest.raises(SettingsError, match="invalid budget"):
        parse_budget(text)
