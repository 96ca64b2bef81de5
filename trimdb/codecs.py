"""Vector codecs for stored token states: FAISS indexes that store and decode unit vectors.

Every codec is a FAISS index factory string over D dimensions with inner-product metric.
Trained codecs (scalar quantizers, product quantizers, PCA) are trained once on the first
segment of an index and saved as ``codec.faiss`` in the vector folder. Later segments start from
a copy of it, so every segment decodes with the same parameters.
"""

from __future__ import annotations

import faiss
import numpy as np

from trimdb.errors import SettingsError

# name: (factory string for dimension D, bytes per vector for dimension D, what it is)
CODECS = {
    "float32": (lambda d: "Flat", lambda d: 4 * d, "exact float32, 4 bytes per dimension"),
    "float16": (lambda d: "SQfp16", lambda d: 2 * d, "float16, 2 bytes per dimension"),
    "sq8": (lambda d: "SQ8", lambda d: d, "8-bit scalar quantization, 1 byte per dimension"),
    "sq4": (lambda d: "SQ4", lambda d: (d + 1) // 2, "4-bit scalar quantization, half a byte per dimension"),
    "pca-sq8": (lambda d: f"PCA{d // 2},SQ8", lambda d: d // 2,
                "PCA to D/2 dimensions, then 8-bit scalar quantization"),
    "pq": (lambda d: f"PQ{d // 4}", lambda d: d // 4, "product quantization, 1 byte per 4 dimensions"),
}
# Product quantization trains 256 centroids per sub-vector and needs at least that many vectors.
MIN_TRAINING_VECTORS = 256


def validate_codec(codec: str) -> None:
    if codec not in CODECS:
        raise SettingsError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def bytes_per_vector(codec: str, dim: int) -> int:
    """Return the stored bytes of one vector under ``codec``, without FAISS's small per-file overhead."""
    validate_codec(codec)
    return CODECS[codec][1](dim)


def build_codec(codec: str, training: np.ndarray) -> tuple[faiss.Index, bool]:
    """Return an empty FAISS index of ``codec`` and whether it was trained on ``training`` (N, D).

    Codecs that need no training (float32, float16) need no saved parameters.
    """
    validate_codec(codec)
    dim = training.shape[1]
    index = faiss.index_factory(dim, CODECS[codec][0](dim), faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        if len(training) < MIN_TRAINING_VECTORS:
            raise SettingsError(
                f"codec {codec} needs at least {MIN_TRAINING_VECTORS} token vectors in the first segment to "
                f"train, got {len(training)}; index more data at once or use --codec float16"
            )
        index.train(np.ascontiguousarray(training, dtype=np.float32))
        return index, True
    return index, False
