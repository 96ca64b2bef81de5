"""Approximate query path for pools too large to scan: sample summaries, then exact rescoring.

`trimdb ann` builds a FAISS index over one summary vector per sample: the normalized mean of
its stored unit token vectors. An approximate query embeds each target sample the same way,
takes the ``candidates`` nearest summaries per target sample (an IVF search over samples, not
tokens), and computes the exact TRIM score of those candidates only, from their stored token
vectors. The selection is exact within the candidates; it misses a sample only when that sample
is outside every target sample's nearest summaries. Recall against the exact scan is measured in
benchmarks/results/perf.md.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from trimdb.errors import SettingsError, StorageError
from trimdb.store import Store, _write_index_atomically

log = logging.getLogger(__name__)

ANN_FILE = "ann.faiss"
# Below this many samples an exact search over summaries is cheap, so no IVF is trained.
MIN_IVF_SAMPLES = 10_000
# FAISS k-means wants at least 39 training points per list.
POINTS_PER_LIST = 39


@dataclass
class AnnSummary:
    """Counts, size and build time of a sample-summary index."""

    n_samples: int
    n_lists: int
    bytes: int
    seconds: float


def build_ann(db_path: str | Path, n_lists: int | None = None) -> AnnSummary:
    """Build the sample-summary index of ``db_path``; ``n_lists`` defaults to about 4 * sqrt(samples)."""
    import time

    started = time.perf_counter()
    with Store(db_path) as store:
        keys, summaries = _sample_summaries(store)
        if len(keys) == 0:
            raise StorageError(f"{store.path} has no indexed samples; run `trimdb index` first")
        index, n_lists = _summary_index(summaries, n_lists)
        index.add_with_ids(summaries, keys)
        path = store.vectors_dir / ANN_FILE
        _write_index_atomically(index, path)
        last_key = int(store.query("SELECT coalesce(max(token_key), 0) FROM tokens").fetchall()[0][0])
        with store.transaction() as connection:
            connection.execute("DELETE FROM catalog WHERE key = 'ann'")
            connection.execute("INSERT INTO catalog VALUES ('ann', ?)", [json.dumps(
                {"file": ANN_FILE, "n_samples": len(keys), "n_lists": n_lists, "last_token_key": last_key})])
        size = path.stat().st_size
    return AnnSummary(len(keys), n_lists, size, time.perf_counter() - started)


def _summary_index(summaries: np.ndarray, n_lists: int | None):
    n, dim = summaries.shape
    if n_lists is None:
        n_lists = 0 if n < MIN_IVF_SAMPLES else int(4 * math.sqrt(n))
    n_lists = min(n_lists, n // POINTS_PER_LIST)
    if n_lists <= 1:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), 0
    index = faiss.index_factory(dim, f"IVF{n_lists},Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(summaries)
    return index, n_lists


def _sample_summaries(store: Store) -> tuple[np.ndarray, np.ndarray]:
    """Return sample keys (N,) and unit mean token vectors (N, D), streamed segment by segment."""
    all_keys, all_summaries = [], []
    for segment in store.segments():
        for ids, vectors in store.iter_vectors(segment, 65_536):
            samples = store.query(
                "SELECT sample_key FROM tokens WHERE token_key BETWEEN ? AND ? ORDER BY token_key",
                [int(ids[0]), int(ids[-1])]).fetchnumpy()["sample_key"]
            keys, sums = _run_sums(np.asarray(samples, dtype=np.int64), vectors)
            all_keys.append(keys)
            all_summaries.append(sums)
    if not all_keys:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    keys = np.concatenate(all_keys)
    # A sample can straddle two scan chunks; add its partial sums together.
    order = np.argsort(keys, kind="stable")
    unique, merged = _run_sums(keys[order], np.concatenate(all_summaries)[order])
    norms = np.maximum(np.linalg.norm(merged, axis=1, keepdims=True), 1e-12)
    return unique, (merged / norms).astype(np.float32)


def _run_sums(keys: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the distinct keys and float64 sums of ``vectors`` over each run of equal adjacent ``keys``."""
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(vectors, starts, axis=0, dtype=np.float64)


def candidate_samples(store: Store, target_summaries: list[np.ndarray], n_candidates: int) -> np.ndarray:
    """Return the sample keys nearest to any target summary (``n_candidates`` per target sample)."""
    catalog = store.catalog().get("ann")
    path = store.vectors_dir / ANN_FILE
    if catalog is None or not path.exists():
        raise StorageError(
            f"{store.path} has no sample-summary index; build it with `trimdb ann --db {store.path}` "
            "or query with --exact")
    last_key = int(store.query("SELECT coalesce(max(token_key), 0) FROM tokens").fetchall()[0][0])
    if catalog["last_token_key"] != last_key:
        raise StorageError(
            f"the sample-summary index of {store.path} is older than the last index run; rebuild it with "
            f"`trimdb ann --db {store.path}`")
    if n_candidates < 1:
        raise SettingsError(f"the number of candidates must be at least 1, got {n_candidates}")
    index = faiss.read_index(str(path))
    if catalog["n_lists"]:
        faiss.extract_index_ivf(index).nprobe = max(8, catalog["n_lists"] // 8)
    queries = np.stack(target_summaries).astype(np.float32)
    _, found = index.search(queries, min(n_candidates, index.ntotal))
    keys = np.unique(found[found >= 0])
    log.info("approximate query: %d candidate samples from %d target samples", len(keys), len(queries))
    return keys


def unit_mean(vectors: np.ndarray) -> np.ndarray:
    """Return the normalized mean of unit vectors (n, D), the summary of one sample."""
    mean = vectors.astype(np.float64).mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
