"""Relevance, length and cost figures of coresets, computed from rankings and pool labels."""

from __future__ import annotations

import math

import numpy as np

from benchmarks.quality.data import is_related
from benchmarks.quality.methods import IndexInfo, MethodRun, coreset


def relevance(ranking: list[str], pool: dict[str, dict], target: str, budget: float) -> dict:
    """Return the related share of the coreset, the pool's base rate and the best share any coreset reaches.

    The base rate is the related share of the whole pool, which a random coreset has on average.
    """
    chosen = coreset(ranking, budget, len(pool))
    n_related_pool = sum(is_related(target, info) for info in pool.values())
    hits = sum(is_related(target, pool[sample_id]) for sample_id in chosen)
    return {
        "share": hits / len(chosen),
        "n": len(chosen),
        "base_rate": n_related_pool / len(pool),
        "ceiling": min(1.0, n_related_pool / len(chosen)),
    }


def source_mix(ranking: list[str], pool: dict[str, dict], budget: float) -> dict[str, int]:
    """Return the number of coreset samples from each source."""
    mix: dict[str, int] = {}
    for sample_id in coreset(ranking, budget, len(pool)):
        source = pool[sample_id]["source"]
        mix[source] = mix.get(source, 0) + 1
    return mix


def length_stats(lengths: list[int]) -> dict:
    """Return the median, 90th percentile and mean of token counts."""
    values = np.asarray(lengths, dtype=float)
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)),
            "mean": float(values.mean())}


def coreset_lengths(ranking: list[str], pool: dict[str, dict], budget: float) -> list[int]:
    """Return the token counts (template included) of a coreset's samples."""
    return [pool[sample_id]["n_tokens"] for sample_id in coreset(ranking, budget, len(pool))]


def query_flops(run: MethodRun, index: IndexInfo, n_parameters: int, hidden_size: int) -> float | None:
    """Return an estimate of one query's FLOPs, or None for methods that run no model.

    A forward pass costs about 2 x parameters FLOPs per token. TRIM adds the scan, 2 x D FLOPs
    per stored token and fingerprint; the embedding baseline adds one pass over the stored
    vectors (D per token) and a cosine per sample and target. LESS stores its own estimate.
    """
    target_tokens = sum(run.n_target_tokens.values())
    if run.method == "trim":
        fingerprints = sum(run.n_fingerprints.values())
        return 2 * n_parameters * target_tokens + 2 * index.n_tokens * hidden_size * fingerprints
    if run.method == "embedding":
        return 2 * n_parameters * target_tokens + index.n_tokens * hidden_size
    if run.method == "less":
        cost = run.stats.get("cost") or {}
        return cost.get("flops")
    return None


def index_flops(index: IndexInfo, n_parameters: int) -> float:
    """Return an estimate of the index pass's FLOPs: 2 x parameters per forward token."""
    return 2.0 * n_parameters * index.n_forward_tokens


def mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan
