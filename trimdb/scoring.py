"""Candidate scoring from stored token vectors (stage II of TRIM).

Token score: ``s_j = h_j . f_t(j)`` when the token's class has a fingerprint, else
``lambda * max_t h_j . f_t`` (the nearest fingerprint, penalized). Sample score:
``mean_weight * mean_j s_j + max_weight * max_j s_j`` over the sample's in-scope tokens.

``SampleAccumulator`` collects per-sample sums, maxima and counts over any number of token
chunks, so the pool is scored in one streaming pass with bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from trimdb.fingerprints import Fingerprints

# Tokens per gather of their own fingerprints: 16,384 x 576 float32 is 36 MiB.
DOT_CHUNK = 16_384


def score_tokens(
    vectors: np.ndarray, token_classes: np.ndarray, fingerprints: Fingerprints, unseen_penalty: float,
    similarities: np.ndarray | None = None, matmul: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return token scores (n,) and a mask (n,) of tokens that took the unseen-class path.

    ``vectors`` (n, D) are unit hidden states. ``similarities`` (n, F), when given, is
    ``vectors @ fingerprints.vectors.T`` already computed by the caller. Without it, a token of a
    seen class costs one dot product with its own fingerprint, and only unseen tokens are
    multiplied with every fingerprint, by ``matmul(a, b)`` (default ``a @ b.T``).
    """
    if len(fingerprints) == 0:
        raise ValueError("cannot score tokens against an empty fingerprint set")
    rows = fingerprints.rows_of(token_classes)
    seen = rows >= 0
    if similarities is not None:
        matched = similarities[np.arange(len(rows)), np.maximum(rows, 0)]
        nearest = similarities.max(axis=1)
        return np.where(seen, matched, unseen_penalty * nearest).astype(np.float64), ~seen
    scores = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(rows), DOT_CHUNK):
        part = slice(start, start + DOT_CHUNK)
        chunk_seen = seen[part]
        own = fingerprints.vectors[rows[part][chunk_seen]]  # (seen tokens, D)
        scores[part][chunk_seen] = np.einsum("nd,nd->n", vectors[part][chunk_seen], own)
    unseen = ~seen
    if unseen.any():
        product = matmul(vectors[unseen], fingerprints.vectors) if matmul else vectors[unseen] @ fingerprints.vectors.T
        scores[unseen] = unseen_penalty * product.max(axis=1)
    return scores, unseen


@dataclass
class SampleScores:
    """Per-sample results over ``n`` sample slots; slots with no in-scope token have count 0."""

    score: np.ndarray
    mean_part: np.ndarray
    max_part: np.ndarray
    unseen_share: np.ndarray
    count: np.ndarray


class SampleAccumulator:
    """Pool token scores into sample scores across streamed chunks."""

    def __init__(self, n_slots: int):
        self.sums = np.zeros(n_slots, dtype=np.float64)
        self.maxima = np.full(n_slots, -np.inf, dtype=np.float64)
        self.counts = np.zeros(n_slots, dtype=np.int64)
        self.unseen = np.zeros(n_slots, dtype=np.int64)

    def add(self, slots: np.ndarray, scores: np.ndarray, unseen: np.ndarray) -> None:
        n = len(self.sums)
        self.sums += np.bincount(slots, weights=scores, minlength=n)
        self.counts += np.bincount(slots, minlength=n)
        self.unseen += np.bincount(slots, weights=unseen.astype(np.float64), minlength=n).astype(np.int64)
        np.maximum.at(self.maxima, slots, scores)

    def finish(self, mean_weight: float, max_weight: float) -> SampleScores:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_part = self.sums / self.counts
            unseen_share = self.unseen / self.counts
        max_part = np.where(self.counts > 0, self.maxima, np.nan)
        score = mean_weight * mean_part + max_weight * max_part
        return SampleScores(score, mean_part, max_part, unseen_share, self.counts.copy())


def rank_samples(scores: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
    """Return indices of scored samples (finite score) best first; ties go to the smaller sample id."""
    finite = np.flatnonzero(np.isfinite(scores))
    order = np.lexsort((sample_ids[finite], -scores[finite]))
    return finite[order]
