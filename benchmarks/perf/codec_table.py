"""Vector codecs: bytes per token on disk and selection quality against float32.

The float32 vectors of an index are encoded into every codec of trimdb.codecs.CODECS exactly as
Store.write_segment does: build_codec trained on the first segment's vectors, IndexIDMap2 over
it. Each encoding is written to a FAISS file and decoded with reconstruct_n as the query scan
does. The decoded
vectors are scored with the fingerprints that a float32 query run stored, through the library's
own score_tokens and SampleAccumulator, and ranked with rank_samples. Quality is the overlap of
the 5% coreset with the float32 coreset and the Spearman correlation of the sample scores.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from trimdb.codecs import CODECS, bytes_per_vector
from trimdb.fingerprints import Fingerprints
from trimdb.query import SCAN_CHUNK
from trimdb.scoring import SampleAccumulator, rank_samples, score_tokens
from trimdb.settings import ScoreSettings, budget_size
from trimdb.store import Store
from benchmarks.perf.scale import REPOSITORY, child_env

log = logging.getLogger(__name__)

# A codec may be the default when it stores at most this share of float32's bytes per token
# and keeps at least MIN_OVERLAP of the float32 5% coreset on every task.
MAX_BYTES_SHARE = 1 / 8
MIN_OVERLAP = 0.95
BUDGET = ("fraction", 0.05)


@dataclass
class IndexVectors:
    """Everything of an index that scoring needs, in token-key order."""

    vectors: np.ndarray  # (N, D) float32 as stored
    token_keys: np.ndarray  # (N,)
    token_classes: np.ndarray  # (N,)
    slots: np.ndarray  # (N,) row of each token's sample in sample_ids
    sample_ids: np.ndarray  # (S,) object
    first_segment_rows: int


@dataclass
class CodecRow:
    """One codec's size, speed and agreement with float32 on each task."""

    codec: str
    file_bytes_per_token: float
    code_bytes_per_token: int
    encode_seconds: float
    decode_seconds: float
    overlap: dict[str, float]
    spearman: dict[str, float]
    max_abs_score_difference: dict[str, float]
    # The timeout in seconds when encoding was stopped; the row then has no measured figures.
    timed_out: float | None = None


def load_index_vectors(db_path: Path) -> IndexVectors:
    """Read every stored vector and the token rows that scoring needs."""
    keys, chunks = [], []
    with Store(db_path, read_only=True) as store:
        segments = store.segments()
        for segment in segments:
            for ids, vectors in store.iter_vectors(segment, SCAN_CHUNK):
                keys.append(ids)
                chunks.append(vectors)
        tokens = store.query("SELECT token_key, sample_key, token_class FROM tokens ORDER BY token_key").fetchnumpy()
        samples = store.query("SELECT sample_key, sample_id FROM samples ORDER BY sample_key").fetchnumpy()
    token_keys = np.concatenate(keys)
    if not np.array_equal(token_keys, np.asarray(tokens["token_key"], dtype=np.int64)):
        raise ValueError(f"{db_path}: the vector segments and the tokens table list different token keys")
    sample_keys = np.asarray(samples["sample_key"], dtype=np.int64)
    return IndexVectors(
        vectors=np.concatenate(chunks),
        token_keys=token_keys,
        token_classes=np.asarray(tokens["token_class"], dtype=np.int64),
        slots=np.searchsorted(sample_keys, np.asarray(tokens["sample_key"], dtype=np.int64)),
        sample_ids=np.asarray(samples["sample_id"], dtype=object),
        first_segment_rows=segments[0].n_vectors,
    )


def load_fingerprints(db_path: Path, run_id: int) -> dict[str, Fingerprints]:
    """Return the fingerprints that query run ``run_id`` stored, per task."""
    with Store(db_path, read_only=True) as store:
        rows = store.query(
            "SELECT task, token_class, vector, n_occurrences, saliency_sum FROM fingerprints "
            "WHERE run_id = ? ORDER BY task, token_class", [run_id]).fetchall()
    by_task: dict[str, list] = {}
    for task, *row in rows:
        by_task.setdefault(task, []).append(row)
    return {task: Fingerprints(
        classes=np.array([row[0] for row in task_rows], dtype=np.int64),
        vectors=np.array([row[1] for row in task_rows], dtype=np.float32),
        occurrences=np.array([row[2] for row in task_rows], dtype=np.int64),
        saliency_sums=np.array([row[3] for row in task_rows], dtype=np.float32),
    ) for task, task_rows in by_task.items()}


def sample_scores(index: IndexVectors, vectors: np.ndarray, fingerprints: Fingerprints,
                  settings: ScoreSettings = ScoreSettings()) -> np.ndarray:
    """Return the TRIM score of every sample slot (NaN for a sample without tokens)."""
    accumulator = SampleAccumulator(len(index.sample_ids))
    for start in range(0, len(vectors), SCAN_CHUNK):
        chunk = slice(start, start + SCAN_CHUNK)
        scores, unseen = score_tokens(vectors[chunk], index.token_classes[chunk], fingerprints,
                                      settings.unseen_penalty)
        accumulator.add(index.slots[chunk], scores, unseen)
    return accumulator.finish(settings.mean_weight, settings.max_weight).score


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Return Spearman's rank correlation of two score arrays over the entries finite in both."""
    finite = np.isfinite(first) & np.isfinite(second)
    ranks = [np.argsort(np.argsort(values[finite], kind="stable"), kind="stable") for values in (first, second)]
    return float(np.corrcoef(ranks[0], ranks[1])[0, 1])


def top_overlap(reference: np.ndarray, other: np.ndarray, sample_ids: np.ndarray) -> float:
    """Return the share of the reference 5% coreset that the other scores select too."""
    reference_order, other_order = rank_samples(reference, sample_ids), rank_samples(other, sample_ids)
    k = budget_size(BUDGET, len(reference_order))
    return len(set(reference_order[:k].tolist()) & set(other_order[:k].tolist())) / k


def encode_codec(codec: str, index: IndexVectors, folder: Path, timeout: float | None) -> tuple[Path, float] | None:
    """Encode the index's vectors as Store.write_segment does in a child process; return the file and seconds.

    Return None when the child runs past ``timeout`` seconds: training some codecs (product
    quantization on 576 dimensions) can take far longer than the rest of the benchmark.
    """
    vectors_file, keys_file = folder / "vectors.npy", folder / "keys.npy"
    if not vectors_file.exists():
        np.save(vectors_file, index.vectors)
        np.save(keys_file, index.token_keys)
    path = folder / f"{codec}.faiss"
    command = [sys.executable, "-m", "benchmarks.perf.codec_child", "--codec", codec, "--vectors", str(vectors_file),
               "--keys", str(keys_file), "--train-rows", str(index.first_segment_rows), "--out", str(path)]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY, env=child_env(),
                                   timeout=timeout)
    except subprocess.TimeoutExpired:
        path.unlink(missing_ok=True)
        return None
    if completed.returncode != 0:
        raise RuntimeError(f"encoding codec {codec} failed with exit code {completed.returncode}: "
                           f"{completed.stderr[-4000:]}")
    return path, json.loads(completed.stdout.strip().splitlines()[-1])["seconds"]


def decode_codec(path: Path) -> tuple[np.ndarray, float]:
    """Read a codec file memory-mapped, as the query does, and decode every vector."""
    started = time.perf_counter()
    encoded = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
    inner = faiss.downcast_index(encoded.index)
    vectors = inner.reconstruct_n(0, encoded.ntotal)
    return vectors, time.perf_counter() - started


def measure_codecs(db_path: Path, run_id: int, folder: Path, codecs: list[str] | None = None,
                   timeout: float | None = None) -> list[CodecRow]:
    """Measure every codec against the float32 vectors and fingerprints of query run ``run_id``.

    A codec whose encoding runs past ``timeout`` seconds gets a row with no figures.
    """
    folder.mkdir(parents=True, exist_ok=True)
    index = load_index_vectors(db_path)
    fingerprints = load_fingerprints(db_path, run_id)
    stored = _stored_scores(db_path, run_id, index)
    reference = {task: sample_scores(index, index.vectors, prints) for task, prints in fingerprints.items()}
    rows = []
    for codec in codecs or list(CODECS):
        encoded = encode_codec(codec, index, folder, timeout)
        if encoded is None:
            log.warning("codec %s: encoding ran past %.0f s and was stopped", codec, timeout)
            rows.append(CodecRow(codec, math.nan, bytes_per_vector(codec, index.vectors.shape[1]), math.nan, math.nan,
                                 {}, {}, {}, timed_out=timeout))
            continue
        path, encode_seconds = encoded
        decoded, decode_seconds = decode_codec(path)
        scores = {task: sample_scores(index, decoded, prints) for task, prints in fingerprints.items()}
        rows.append(CodecRow(
            codec=codec,
            file_bytes_per_token=path.stat().st_size / len(index.vectors),
            code_bytes_per_token=bytes_per_vector(codec, index.vectors.shape[1]),
            encode_seconds=encode_seconds,
            decode_seconds=decode_seconds,
            overlap={task: top_overlap(reference[task], scores[task], index.sample_ids) for task in scores},
            spearman={task: spearman(reference[task], scores[task]) for task in scores},
            max_abs_score_difference={task: _max_abs_difference(stored[task], scores[task]) for task in scores},
        ))
        path.unlink()
        log.info("codec %s: %.0f bytes per token, overlap %s", codec, rows[-1].file_bytes_per_token,
                 {task: round(value, 3) for task, value in rows[-1].overlap.items()})
    for leftover in ("vectors.npy", "keys.npy"):
        (folder / leftover).unlink(missing_ok=True)
    return rows


def _stored_scores(db_path: Path, run_id: int, index: IndexVectors) -> dict[str, np.ndarray]:
    """Return the scores that query run ``run_id`` stored, per task, in sample-slot order."""
    with Store(db_path, read_only=True) as store:
        rows = store.query("SELECT sc.task, s.sample_id, sc.score FROM scores sc JOIN samples s USING (sample_key) "
                            "WHERE sc.run_id = ?", [run_id]).fetchall()
    slot_of = {sample_id: slot for slot, sample_id in enumerate(index.sample_ids)}
    scores: dict[str, np.ndarray] = {}
    for task, sample_id, score in rows:
        scores.setdefault(task, np.full(len(index.sample_ids), np.nan))[slot_of[sample_id]] = score
    return scores


def _max_abs_difference(first: np.ndarray, second: np.ndarray) -> float:
    finite = np.isfinite(first) & np.isfinite(second)
    return float(np.max(np.abs(first[finite] - second[finite]))) if finite.any() else math.nan


def default_codec(rows: list[CodecRow], float32_bytes: float) -> tuple[CodecRow | None, str]:
    """Return the smallest codec within MAX_BYTES_SHARE of float32 and MIN_OVERLAP on every task, and why.

    Size is compared in code bytes per token, the bytes the codec stores per vector. The FAISS
    file adds 8 bytes of token key per vector to every codec.
    """
    eligible = [row for row in rows if row.timed_out is None
                and row.code_bytes_per_token <= MAX_BYTES_SHARE * float32_bytes
                and min(row.overlap.values()) >= MIN_OVERLAP]
    if not eligible:
        return None, (f"no codec stores at most 1/8 of float32's {float32_bytes:.0f} code bytes per token "
                      f"and keeps {MIN_OVERLAP:.0%} of the float32 5% coreset on every task")
    best = min(eligible, key=lambda row: (row.code_bytes_per_token, -min(row.overlap.values())))
    return best, (f"{best.codec}: {best.code_bytes_per_token} code bytes per token "
                  f"({best.code_bytes_per_token / float32_bytes:.3f} of float32) and a 5% overlap of at least "
                  f"{min(best.overlap.values()):.1%} on every task")
