"""Query speed: `trimdb query` from stored vectors against recomputing TRIM with forward passes.

Recomputing TRIM from scratch for a new task needs the pool's forward passes again plus
everything the query itself does (target forward pass, fingerprints, scoring, selection). Its
time is estimated as the bare forward time over the pool (from the overhead benchmark) plus the
query's own time without its model load. The speed-up is that sum over the query time without
model load, so neither side pays for loading the model.

The scan rate compares the query's scan phase with a plain read of the same stored vectors, both
in bytes of stored vector files per second. The scan (trimdb.query._scan) decodes vectors, reads
their token rows from DuckDB and scores every task. The plain read runs Store.iter_vectors over
every segment and sums each chunk.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from trimdb.ann import build_ann
from trimdb.query import SCAN_CHUNK
from trimdb.store import Store
from benchmarks.perf.query_child import timed_query

log = logging.getLogger(__name__)


@dataclass
class ScanRead:
    """A plain read of every stored vector: seconds, vectors, stored and decoded bytes."""

    seconds: float
    n_vectors: int
    stored_bytes: int
    decoded_bytes: int

    @property
    def stored_gb_per_second(self) -> float:
        return self.stored_bytes / self.seconds / 1e9


@dataclass
class QueryResult:
    """Repeated timings of one task's query, the plain read, and the two-task run used by the codec table."""

    task: str
    runs: list[dict]
    read: ScanRead
    both_tasks: dict

    @property
    def best(self) -> dict:
        return min(self.runs, key=lambda run: run["seconds"] - run["load_seconds"])

    @property
    def query_seconds(self) -> float:
        """Return the best query time without its model load."""
        return self.best["seconds"] - self.best["load_seconds"]

    def recompute_seconds(self, forward_seconds: float) -> float:
        return forward_seconds + self.query_seconds

    def speedup(self, forward_seconds: float) -> float:
        return self.recompute_seconds(forward_seconds) / self.query_seconds

    @property
    def scan_gb_per_second(self) -> float:
        return self.read.stored_bytes / self.best["scan_seconds"] / 1e9


def plain_read(db_path: Path, chunk: int = SCAN_CHUNK) -> ScanRead:
    """Decode every stored vector segment by segment and sum each chunk; return the time and bytes."""
    started = time.perf_counter()
    total = 0.0
    n_vectors = stored = dim = 0
    with Store(db_path, read_only=True) as store:
        for segment in store.segments():
            for _, vectors in store.iter_vectors(segment, chunk):
                total += float(vectors.sum())
            n_vectors += segment.n_vectors
            stored += (store.vectors_dir / segment.file).stat().st_size
            dim = segment.dim
    seconds = time.perf_counter() - started
    log.debug("plain read: checksum %.3f", total)
    return ScanRead(seconds, n_vectors, stored, n_vectors * dim * 4)


def measure_query(db_path: Path, targets: dict[str, Path], task: str, repeats: int = 2, budget: str = "5%",
                  layers: int | None = None) -> QueryResult:
    """Time ``repeats`` queries of ``task``, a plain read, and one query of every target task."""
    runs = []
    for _ in range(repeats):
        runs.append(timed_query(str(db_path), {task: str(targets[task])}, budget, layers=layers))
        log.info("query %s: %.1f s (model load %.1f s, scan %.1f s)", task, runs[-1]["seconds"],
                 runs[-1]["load_seconds"], runs[-1]["scan_seconds"])
    read = plain_read(db_path)
    log.info("plain read of %d vectors: %.2f s", read.n_vectors, read.seconds)
    both = timed_query(str(db_path), {name: str(path) for name, path in targets.items()}, budget, layers=layers)
    log.info("query %s: %.1f s", ", ".join(targets), both["seconds"])
    return QueryResult(task, runs, read, both)



@dataclass
class AnnResult:
    """Measurements of the approximate path on a real index: build cost, query time, overlap with the exact scan."""

    build_seconds: float
    bytes: int
    n_samples: int
    query: dict
    exact_query: dict
    overlap: dict[str, float]


def measure_ann(db_path: Path, targets: dict[str, Path], exact: dict, budget: str = "5%",
                layers: int | None = None) -> AnnResult:
    """Build the sample-summary index, run an approximate query of every task (candidates "auto"),
    and compare its selections with those of the exact run ``exact`` (a timed_query report)."""
    summary = build_ann(db_path)
    approximate = timed_query(str(db_path), {name: str(path) for name, path in targets.items()}, budget,
                              candidates="auto", layers=layers)
    exact_picks, approximate_picks = _selections(db_path, exact["run_id"]), _selections(db_path, approximate["run_id"])
    overlap = {task: len(picks & approximate_picks.get(task, set())) / len(picks)
               for task, picks in exact_picks.items()}
    log.info("approximate query: %.1f s, overlap with the exact selection %s", approximate["seconds"], overlap)
    return AnnResult(summary.seconds, summary.bytes, summary.n_samples, approximate, exact, overlap)


def _selections(db_path: Path, run_id: int) -> dict[str, set[int]]:
    with Store(db_path, read_only=True) as store:
        rows = store.query("SELECT task, sample_key FROM selections WHERE run_id = ?", [run_id]).fetchall()
    picks: dict[str, set[int]] = {}
    for task, sample_key in rows:
        picks.setdefault(task, set()).add(sample_key)
    return picks
