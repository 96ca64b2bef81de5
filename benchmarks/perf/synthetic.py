"""Synthetic trimdb stores for the scale curve: seeded random unit vectors in a real store.

The vectors are synthetic: standard normal draws (seeded per segment) scaled to unit length.
Every sample has 200 to 400 tokens (about 300), random token classes in [0, vocab_size), prompt
tokens first and response tokens after them. The store has the same tables and files as one that
`trimdb index` writes. Vector segments go through Store.write_segment, token and sample rows
through Store.insert_arrow, and the catalog is copied from a real index. `trimdb query` therefore
runs on it unchanged, and its target forward pass uses the real model named in that catalog.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import torch

from trimdb.codecs import bytes_per_vector
from trimdb.render import PROMPT, RESPONSE
from trimdb.store import Store

# Vectors per segment; 1M float32 vectors of 576 dimensions take 2.3 GB while they are encoded.
CHUNK_VECTORS = 1_000_000
MIN_SAMPLE_TOKENS, MAX_SAMPLE_TOKENS = 200, 400
# DuckDB bytes per token row (tokens table), estimated on the demo index; used for the disk check.
TOKEN_ROW_BYTES = 25
# The disk must hold twice the estimated store size.
DISK_MARGIN = 2.0
SYNTHETIC_SOURCE = "synthetic"


@dataclass
class SyntheticSpec:
    """Contents of a synthetic store apart from its size: catalog, codec, seed and vocabulary."""

    catalog: dict
    codec: str
    seed: int = 0
    vocab_size: int = 49152
    chunk_vectors: int = CHUNK_VECTORS

    @property
    def dim(self) -> int:
        return int(self.catalog["model"]["hidden_size"])


def estimated_bytes(n_vectors: int, codec: str, dim: int) -> int:
    """Return the estimated disk use of a store of ``n_vectors``: codes, FAISS ids and token rows."""
    return n_vectors * (bytes_per_vector(codec, dim) + 8 + TOKEN_ROW_BYTES)


def fit_sizes(sizes: list[int], folder: Path, codec: str, dim: int) -> tuple[list[int], str | None]:
    """Shrink the largest sizes so that the largest store fits on disk twice; return sizes and a note.

    The stores grow in place, so only the largest one needs to fit.
    """
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    limit = int(free / DISK_MARGIN) // (bytes_per_vector(codec, dim) + 8 + TOKEN_ROW_BYTES)
    fitted = sorted({min(size, limit) for size in sizes})
    if fitted == sorted(sizes):
        return fitted, None
    note = (f"{free / 1e9:.1f} GB free in {folder}: sizes above {limit:,} vectors would not fit twice "
            f"({codec}), so the largest size was cut to {limit:,}")
    return fitted, note


def catalog_for(source_catalog: dict, codec: str) -> dict:
    """Return a copy of a real index's catalog whose index settings name ``codec``."""
    catalog = json.loads(json.dumps(source_catalog))
    catalog["index_settings"]["codec"] = codec
    return catalog


def grow_store(db_path: Path, n_vectors: int, spec: SyntheticSpec) -> int:
    """Append synthetic segments to the store at ``db_path`` until it holds ``n_vectors``; return the count."""
    with Store(db_path, create=True) as store:
        if not store.catalog():
            _start_store(store, spec.catalog)
        stored = sum(segment.n_vectors for segment in store.segments())
        while stored < n_vectors:
            count = min(spec.chunk_vectors, n_vectors - stored)
            _write_chunk(store, count, spec)
            stored += count
    return stored


def _start_store(store: Store, catalog: dict) -> None:
    with store.transaction() as connection:
        for key in ("model", "index_settings"):
            connection.execute("INSERT INTO catalog VALUES (?, ?)", [key, json.dumps(catalog[key])])
        store.insert_run(connection, 1, "index", {"synthetic": True}, catalog["index_settings"])
        connection.execute("INSERT INTO sources VALUES (?, ?, ?)", [1, SYNTHETIC_SOURCE, 1])


def sample_lengths(rng: np.random.Generator, n_tokens: int) -> np.ndarray:
    """Return sample lengths in [MIN_SAMPLE_TOKENS, MAX_SAMPLE_TOKENS] that sum to ``n_tokens``.

    The last sample takes the remainder, so it may be shorter than MIN_SAMPLE_TOKENS.
    """
    draws = rng.integers(MIN_SAMPLE_TOKENS, MAX_SAMPLE_TOKENS + 1, size=n_tokens // MIN_SAMPLE_TOKENS + 1)
    ends = np.cumsum(draws)
    n_samples = int(np.searchsorted(ends, n_tokens)) + 1
    lengths = draws[:n_samples].copy()
    lengths[-1] = n_tokens - int(lengths[:-1].sum())
    return lengths


def unit_vectors(seed: int, count: int, dim: int) -> np.ndarray:
    """Return ``count`` synthetic unit vectors (count, dim) float32: normal draws scaled to length 1.

    torch draws the normals because it is several times faster than numpy's generator here.
    """
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn((count, dim), generator=generator, dtype=torch.float32).numpy()
    faiss.normalize_L2(vectors)
    return vectors


def _write_chunk(store: Store, count: int, spec: SyntheticSpec) -> None:
    segment_id = store.next_id("segments", "segment_id")
    first_token_key = store.next_id("tokens", "token_key")
    first_sample_key = store.next_id("samples", "sample_key")
    rng = np.random.default_rng([spec.seed, segment_id])
    lengths = sample_lengths(rng, count)
    token_keys = first_token_key + np.arange(count, dtype=np.int64)
    vectors = unit_vectors(spec.seed * 1_000_003 + segment_id, count, spec.dim)
    file_name, file_bytes = store.write_segment(segment_id, vectors, token_keys, spec.codec)
    del vectors
    tokens = _token_table(rng, lengths, token_keys, first_sample_key, spec.vocab_size)
    samples = _sample_table(tokens, lengths, first_sample_key)
    with store.transaction() as connection:
        store.insert_arrow(connection, "samples", samples)
        store.insert_arrow(connection, "tokens", tokens)
        connection.execute(
            "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [segment_id, 1, file_name, count, int(token_keys[0]), int(token_keys[-1]), spec.dim, spec.codec,
             file_bytes],
        )


def _token_table(rng, lengths, token_keys, first_sample_key, vocab_size) -> pa.Table:
    n_samples, count = len(lengths), int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = np.arange(count, dtype=np.int64) - starts  # (count,) position inside the sample
    n_prompt = np.repeat((lengths * rng.uniform(0.2, 0.6, size=n_samples)).astype(np.int64), lengths)
    return pa.table({
        "token_key": token_keys,
        "sample_key": np.repeat(first_sample_key + np.arange(n_samples, dtype=np.int64), lengths),
        "position": positions.astype(np.int32),
        "token_class": rng.integers(0, vocab_size, size=count, dtype=np.int32),
        "part": np.where(positions < n_prompt, PROMPT, RESPONSE).astype(np.int8),
        "saliency": pa.nulls(count, pa.float32()),
    })


def _sample_table(tokens: pa.Table, lengths: np.ndarray, first_sample_key: int) -> pa.Table:
    n_samples = len(lengths)
    keys = first_sample_key + np.arange(n_samples, dtype=np.int64)
    parts = tokens.column("part").to_numpy()
    n_prompt = np.add.reduceat((parts == PROMPT).astype(np.int32), np.cumsum(lengths) - lengths)
    ids = [f"synthetic-{key:012d}" for key in keys.tolist()]
    return pa.table({
        "sample_key": keys,
        "sample_id": ids,
        "source_id": pa.array(np.ones(n_samples, dtype=np.int32)),
        "run_id": pa.array(np.ones(n_samples, dtype=np.int32)),
        "path": [SYNTHETIC_SOURCE] * n_samples,
        "line": pa.array(np.arange(1, n_samples + 1, dtype=np.int32)),
        "n_turns": pa.array(np.full(n_samples, 2, dtype=np.int32)),
        "n_tokens": pa.array(lengths.astype(np.int32)),
        "n_prompt_tokens": pa.array(n_prompt.astype(np.int32)),
        "n_response_tokens": pa.array((lengths - n_prompt).astype(np.int32)),
        "truncated": pa.array(np.zeros(n_samples, dtype=bool)),
        "record": [json.dumps({"synthetic": key}) for key in keys.tolist()],
        "text_hash": [hashlib.sha256(sample_id.encode()).hexdigest() for sample_id in ids],
    })
