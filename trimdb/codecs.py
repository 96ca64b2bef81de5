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
    # "np" turns off FAISS's polysemous training, which reorders codes for Hamming search (unused
    # here) and takes minutes.
    "pq2": (lambda d: f"PQ{d // 2}x8np", lambda d: d // 2,
            "product quantization, 1 byte per 2 dimensions (256 centroids per pair)"),
    "pq4": (lambda d: f"PQ{d // 4}x8np", lambda d: d // 4,
            "product quantization, 1 byte per 4 dimensions (256 centroids per group of 4)"),
}
# Product quantization trains 256 centroids per sub-vector and needs at least that many vectors.
MIN_TRAINING_VECTORS = 256
# k-means settings of the product quantizers: one k-means per sub-vector (D/2 of them for pq2), so
# FAISS's defaults (25 iterations, up to 65,536 points) take minutes on 2 cores. 15 iterations over
# up to 16,384 points cost about a fifth of that.
PQ_ITERATIONS = 15
PQ_POINTS_PER_CENTROID = 64


# The default codec "auto" resolves when an index is created: sq8 when the first segment has at
# least AUTO_MIN_VECTORS vectors to train on, else float32 (an index that small costs little disk).
# On the demo pool sq8 keeps at least 97.8% of each float32 5% coreset at a quarter of the bytes,
# and no codec at an eighth keeps 95% (benchmarks/results/perf.md, section 3).
AUTO = "auto"
AUTO_CODEC = "sq8"
AUTO_MIN_VECTORS = 65_536


def validate_codec(codec: str) -> None:
    if codec != AUTO and codec not in CODECS:
        raise SettingsError(f"unknown codec {codec!r}; choose {AUTO} or one of {', '.join(CODECS)}")


def resolve_codec(codec: str, first_segment_vectors: int) -> str:
    """Return the codec a new index stores: ``codec`` itself, or what "auto" picks for its first segment."""
    validate_codec(codec)
    if codec != AUTO:
        return codec
    return AUTO_CODEC if first_segment_vectors >= AUTO_MIN_VECTORS else "float32"


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
    if isinstance(index, faiss.IndexPQ):
        index.pq.cp.niter = PQ_ITERATIONS
        index.pq.cp.max_points_per_centroid = PQ_POINTS_PER_CENTROID
    if not index.is_trained:
        if len(training) < MIN_TRAINING_VECTORS:
            raise SettingsError(
                f"codec {codec} needs at least {MIN_TRAINING_VECTORS} token vectors in the first segment to "
                f"train, got {len(training)}; index more data at once or use --codec float16"
            )
        index.train(np.ascontiguousarray(training, dtype=np.float32))
        return index, True
    return index, False
