"""Index the pool once and run every selection method over it; read the rankings back.

The index is cached beside a key file: the SHA-256 of the pool file and the index settings. A
rerun with the same pool and settings reuses it; any change rebuilds it. Every method's query
writes one run into the same database, and its full ranking is read from the ``scored`` view, so
the 1% and the 5% coresets of one run are prefixes of one ranking.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from trimdb import __version__
from trimdb.indexing import index_corpus
from trimdb.query import query_tasks
from trimdb.settings import METHODS, IndexSettings, ScoreSettings
from trimdb.store import Store

log = logging.getLogger(__name__)

# Methods of the headline table, in page order; "less" runs only where trimdb offers it.
BASELINES = ("random", "bm25", "embedding", "less")
RANDOM_SEEDS = (0, 1)


@dataclass
class IndexInfo:
    """One cached index: where it is, what it cost and what it holds."""

    db: Path
    seconds: float
    n_samples: int
    n_tokens: int
    n_forward_tokens: int
    cached: bool
    adapter: str | None = None


@dataclass
class MethodRun:
    """One query run: its label on the page, method, seed, settings, run id, seconds and stored stats."""

    label: str
    method: str
    run_id: int
    seconds: float
    seed: int = 0
    settings: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    n_target_tokens: dict[str, int] = field(default_factory=dict)
    n_fingerprints: dict[str, int] = field(default_factory=dict)


def available_methods() -> list[str]:
    """Return the baseline methods this trimdb offers, in page order."""
    return [method for method in BASELINES if method in METHODS]


def index_key(pool_path: Path, settings: IndexSettings, model: str | None, adapter: str | None) -> str:
    """Return the SHA-256 that names one index: pool bytes, index settings, model, adapter, trimdb version."""
    digest = hashlib.sha256(Path(pool_path).read_bytes())
    meta = {"settings": settings.to_dict(), "model": model, "adapter": adapter, "trimdb": __version__}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()


def ensure_index(db: Path, pool_path: Path, settings: IndexSettings, *, model: str | None = None,
                 adapter: str | None = None, progress: bool = False) -> IndexInfo:
    """Return the index of ``pool_path`` at ``db``, building it unless the key file matches."""
    key = index_key(pool_path, settings, model, adapter)
    key_file = db.with_name(db.name + ".key.json")
    if db.exists() and key_file.exists():
        stored = json.loads(key_file.read_text())
        if stored.get("key") == key:
            log.info("reusing the index %s (key %s)", db, key[:12])
            return IndexInfo(db=db, cached=True, adapter=adapter, **stored["summary"])
    _remove_index(db, key_file)
    summary = index_corpus(db, [pool_path], model=model, settings=settings, source_column="source",
                           progress=progress, adapter=adapter)
    info = {"seconds": summary.seconds, "n_samples": summary.n_samples, "n_tokens": summary.n_tokens,
            "n_forward_tokens": summary.n_forward_tokens}
    key_file.write_text(json.dumps({"key": key, "summary": info}, indent=2))
    log.info("indexed %d samples (%d tokens) in %.1f s", summary.n_samples, summary.n_tokens, summary.seconds)
    return IndexInfo(db=db, cached=False, adapter=adapter, **info)


def _remove_index(db: Path, key_file: Path) -> None:
    for path in (db, key_file, db.with_name(db.name + ".wal")):
        path.unlink(missing_ok=True)
    shutil.rmtree(db.with_name(db.name + ".vectors"), ignore_errors=True)


def run_method(db: Path, targets: dict[str, Path], label: str, method: str, *, seed: int = 0,
               settings: ScoreSettings = ScoreSettings(), budget: str = "5%", adapter: str | None = None,
               progress: bool = False) -> MethodRun:
    """Run one query over every target task and return its run; the ranking stays in the database.

    A finished run of the same database with the same query key (method, seed, settings, budget,
    adapter, target file contents and trimdb version) is reused, so a rerun after a crash resumes.
    """
    key = query_key(targets, method, seed, settings, budget, adapter)
    run = _cached_run(db, key, label, method, seed, settings)
    if run is not None:
        log.info("%s: reusing run %d (%.1f s when it ran)", label, run.run_id, run.seconds)
        return run
    result = query_tasks(db, {name: str(path) for name, path in targets.items()}, budget, settings=settings,
                         method=method, seed=seed, adapter=adapter, progress=progress,
                         arguments={"benchmark": "quality", "label": label, "query_key": key})
    _store_seconds(db, result.run_id, result.seconds)
    log.info("%s: run %d in %.1f s", label, result.run_id, result.seconds)
    return _cached_run(db, key, label, method, seed, settings)


def query_key(targets: dict[str, Path], method: str, seed: int, settings: ScoreSettings, budget: str,
              adapter: str | None) -> str:
    """Return the SHA-256 of everything a query run's ranking depends on, besides the index."""
    digest = hashlib.sha256()
    for name in sorted(targets):
        digest.update(name.encode())
        digest.update(Path(targets[name]).read_bytes())
    meta = {"method": method, "seed": seed, "settings": settings.to_dict(), "budget": budget, "adapter": adapter,
            "trimdb": __version__}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()


def _store_seconds(db: Path, run_id: int, seconds: float) -> None:
    """Record the query's wall time (QueryResult.seconds) in the run's arguments, which trimdb keeps as given."""
    with Store(db) as store, store.transaction() as connection:
        connection.execute("UPDATE runs SET arguments = json_merge_patch(arguments, ?) WHERE run_id = ?",
                           [json.dumps({"seconds": seconds}), run_id])


def _cached_run(db: Path, key: str, label: str, method: str, seed: int, settings: ScoreSettings) -> MethodRun | None:
    with Store(db, read_only=True) as store:
        rows = store.query(
            "SELECT run_id, stats, json_extract(arguments, '$.seconds') FROM runs WHERE kind = 'query' "
            "AND json_extract_string(arguments, '$.query_key') = ? AND finished_at IS NOT NULL "
            "AND json_extract(arguments, '$.seconds') IS NOT NULL ORDER BY run_id DESC LIMIT 1", [key]).fetchall()
        if not rows:
            return None
        run_id, stats, seconds = rows[0]
        tasks = store.query("SELECT task, n_target_tokens, n_fingerprints FROM tasks WHERE run_id = ?",
                            [run_id]).fetchall()
    stats = json.loads(stats) if isinstance(stats, str) else (stats or {})
    return MethodRun(
        label=label, method=method, run_id=run_id, seconds=float(json.loads(str(seconds))), seed=seed,
        settings=settings.to_dict(), stats=stats,
        n_target_tokens={task: int(n) for task, n, _ in tasks}, n_fingerprints={task: int(f) for task, _, f in tasks},
    )


def read_pool(db: Path) -> dict[str, dict]:
    """Return sample_id -> {source, task, n_tokens, record} for every indexed sample."""
    with Store(db, read_only=True) as store:
        rows = store.query("SELECT sample_id, source, record->>'task', n_tokens, record FROM sample_info").fetchall()
    return {row[0]: {"source": row[1], "task": row[2], "n_tokens": int(row[3]), "record": row[4]} for row in rows}


def read_rankings(db: Path, run_id: int) -> dict[str, list[str]]:
    """Return task -> sample ids of one run in rank order (every scored sample)."""
    with Store(db, read_only=True) as store:
        rows = store.query("SELECT task, sample_id FROM scored WHERE run_id = ? ORDER BY task, rank",
                           [run_id]).fetchall()
    rankings: dict[str, list[str]] = {}
    for task, sample_id in rows:
        rankings.setdefault(task, []).append(sample_id)
    return rankings


def coreset(ranking: list[str], budget: float, n_pool: int) -> list[str]:
    """Return the top ``ceil(budget * n_pool)`` sample ids of a ranking."""
    return ranking[:max(1, math.ceil(budget * n_pool))]
