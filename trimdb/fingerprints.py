"""Token-class fingerprints of a target task (end of stage I of TRIM).

The fingerprint of token class t (a vocabulary id) is the saliency-weighted sum of the unit
hidden states of every in-scope target token of that class, ``f_t = sum_i alpha_i h_i / |h_i|``,
rescaled to unit length. A class whose sum is shorter than 1e-8 (all its tokens had saliency 0)
has no direction and is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from trimdb.settings import MIN_FINGERPRINT_NORM


@dataclass
class Fingerprints:
    """F fingerprints: ``classes`` (F,) sorted ascending, unit ``vectors`` (F, D), with their support."""

    classes: np.ndarray
    vectors: np.ndarray
    occurrences: np.ndarray
    saliency_sums: np.ndarray

    def __len__(self) -> int:
        return len(self.classes)

    def rows_of(self, token_classes: np.ndarray) -> np.ndarray:
        """Return each token class's fingerprint row, or -1 for a class without a fingerprint."""
        if len(self.classes) == 0:
            return np.full(len(token_classes), -1, dtype=np.int64)
        rows = np.searchsorted(self.classes, token_classes)
        rows = np.minimum(rows, len(self.classes) - 1)
        return np.where(self.classes[rows] == token_classes, rows, -1)


def build_fingerprints(
    token_classes: Sequence[np.ndarray], hidden: Sequence[np.ndarray], saliency: Sequence[np.ndarray]
) -> Fingerprints:
    """Build fingerprints from the in-scope tokens of the target samples.

    Each argument holds one array per target sample: token classes (n,), unit hidden states
    (n, D) and saliency (n,), already restricted to in-scope tokens.
    """
    if not len(token_classes) == len(hidden) == len(saliency):
        raise ValueError(
            f"got {len(token_classes)} class arrays, {len(hidden)} hidden arrays and {len(saliency)} saliency arrays"
        )
    classes = np.concatenate([np.asarray(c, dtype=np.int64) for c in token_classes]) if token_classes else np.zeros(0, np.int64)
    if classes.size == 0:
        dim = hidden[0].shape[1] if hidden else 0
        return Fingerprints(classes, np.zeros((0, dim), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))
    states = np.concatenate(hidden).astype(np.float32)  # (n, D)
    weights = np.concatenate(saliency).astype(np.float32)  # (n,)
    if states.shape[0] != classes.shape[0] or weights.shape[0] != classes.shape[0]:
        raise ValueError(f"{classes.shape[0]} tokens but {states.shape[0]} hidden states and {weights.shape[0]} weights")

    unique, inverse = np.unique(classes, return_inverse=True)
    sums = np.zeros((len(unique), states.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, weights[:, None].astype(np.float64) * states)
    occurrences = np.bincount(inverse, minlength=len(unique))
    saliency_sums = np.bincount(inverse, weights=weights, minlength=len(unique))

    norms = np.linalg.norm(sums, axis=1)
    keep = norms >= MIN_FINGERPRINT_NORM
    vectors = (sums[keep] / norms[keep, None]).astype(np.float32)
    return Fingerprints(unique[keep], vectors, occurrences[keep], saliency_sums[keep].astype(np.float32))
