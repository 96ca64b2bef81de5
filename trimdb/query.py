"""`trimdb query`: fingerprints for each target task, then exact TRIM scores from stored vectors.

Stages, in order:
1. load the index's model and check its identity against the catalog;
2. forward passes over the target samples only, with attention on the last L layers;
3. saliency and token-class fingerprints per task;
4. one streaming pass over the stored vector segments scores every task at once;
5. rank, select the budget, and write fingerprints, scores and selections in one transaction.

No forward pass runs over the pool: its token states were stored by `trimdb index`. The baseline
methods (random, bm25, embedding in trimdb.baselines, and less in trimdb.less) replace stages 1 to 4
and share stage 5. Of these, only less runs the model over the pool, a forward and a backward pass
per sample.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from trimdb.ann import candidate_samples, unit_mean
from trimdb.baselines import BaselinePool, read_targets, score_baseline
from trimdb.errors import InputError, RenderError, SettingsError, StorageError
from trimdb.fingerprints import Fingerprints, build_fingerprints
from trimdb.forward import encode
from trimdb.indexing import check_index_ready
from trimdb.less import score_less
from trimdb.models import check_identity, load_model
from trimdb.render import PROMPT, RESPONSE, TEMPLATE, Renderer
from trimdb.saliency import blend_saliency
from trimdb.scoring import SampleAccumulator, SampleScores, rank_samples, score_tokens
from trimdb.selection import (
    CombinedPick, Deduplicator, Removal, combine_rankings, parse_split, select_ranked, split_budget,
)
from trimdb.settings import METHODS, IndexSettings, ScoreSettings, SelectionSettings, budget_size, parse_budget
from trimdb.store import Store

log = logging.getLogger(__name__)

# Token vectors scored per chunk: 65,536 x 576 float32 is 150 MB, a bound on scan memory.
SCAN_CHUNK = 65_536
# --approximate without --candidates shares 4 budgets of nearest summaries among a task's target
# samples (at least 100 each), so a task scores at most about 4 budgets of samples. The recall this
# gives is measured in benchmarks/results/perf.md.
AUTO_CANDIDATE_FACTOR = 4
AUTO_MIN_CANDIDATES = 100
# Below this many token vectors per chunk, copying to the GPU costs more than the product saves.
GPU_MIN_ROWS = 4096
SCOPE_PARTS = {"all": (PROMPT, RESPONSE), "response": (RESPONSE,), "prompt": (PROMPT,)}


@dataclass
class TaskResult:
    """One target task's fingerprints and its place in the query run."""

    task: str
    target_path: str
    n_targets: int
    n_target_tokens: int
    fingerprints: Fingerprints
    n_scored: int = 0
    n_selected: int = 0
    # One summary per target sample (unit mean of its content token states), for --approximate.
    summaries: list[np.ndarray] = field(default_factory=list)


@dataclass
class QueryResult:
    """The run id and per-task results of one query run."""

    run_id: int
    tasks: list[TaskResult] = field(default_factory=list)
    seconds: float = 0.0


def query_tasks(
    db_path: str | Path,
    tasks: dict[str, str | Path],
    budget: str | int,
    *,
    settings: ScoreSettings = ScoreSettings(),
    selection: SelectionSettings = SelectionSettings(),
    where: str | None = None,
    candidates: int | str | None = None,
    model: str | None = None,
    format: str | None = None,
    progress: bool = True,
    arguments: dict | None = None,
    method: str = "trim",
    adapter: str | Path | None = None,
    seed: int = 0,
) -> QueryResult:
    """Score every indexed sample for each task and store the ranked selections.

    Each task gets its own coreset of the full budget; the run's combined coreset splits the
    budget over the tasks (see trimdb.selection). With ``candidates``, only the samples nearest to
    the target samples in the sample-summary index (trimdb.ann) are scored, each one exactly.
    """
    settings.validate()
    selection.validate()
    if isinstance(selection.split, dict):
        parse_split(",".join(f"{k}={v}" for k, v in selection.split.items()), list(tasks))
    parsed_budget = parse_budget(budget)
    if not tasks:
        raise SettingsError("no target task given; pass --task NAME=FILE")
    _check_method(method, candidates, seed)
    started = time.perf_counter()
    with Store(db_path) as store:
        catalog = check_index_ready(store)
        _check_where(store, where)  # before any model loads
        if method != "trim":
            run_id, results = _query_baseline(store, catalog, tasks, parsed_budget, method, seed, settings, selection,
                                              where, model, adapter, format, progress, arguments, started)
            return QueryResult(run_id, results, time.perf_counter() - started)
        # Target files are read first, so a bad one fails before the model loads.
        targets = {name: read_targets(name, path, format) for name, path in tasks.items()}
        loaded, renderer = _load_index_model(catalog, model, adapter)

        loaded.use_attention("eager")
        results = [_fingerprint_task(name, Path(tasks[name]), samples, loaded, renderer, settings)
                   for name, samples in targets.items()]
        if candidates == "auto":
            n_samples = int(store.query("SELECT count(*) FROM samples").fetchall()[0][0])
            candidates = auto_candidates(budget_size(parsed_budget, n_samples), min(r.n_targets for r in results))
        if candidates is None:
            scores, sample_keys, sample_ids = _scan(store, results, settings, where, progress)
        else:
            scores, sample_keys, sample_ids = _scan_candidates(store, results, settings, where, candidates)
        pool_size = int(_allowed_samples(store, sample_keys, where).sum()) if candidates is not None else None
        selections = _select(store, results, scores, sample_keys, sample_ids, parsed_budget, selection, pool_size)
        run_settings = settings.to_dict() | selection.to_dict() | {
            "method": method, "budget": list(parsed_budget), "where": where, "candidates": candidates}
        run_id = _write(store, results, scores, sample_keys, selections, run_settings, loaded, arguments or {},
                        started)
    return QueryResult(run_id, results, time.perf_counter() - started)


def _stored_model_path(catalog: dict) -> str:
    path = catalog["model"]["path"]
    if not Path(path).exists():
        raise StorageError(
            f"the index's model folder {path} no longer exists; pass --model with the same model "
            f"({catalog['model']['name']}), it is checked by hash"
        )
    return path


def _stored_adapter_path(catalog: dict, model: str | None, adapter: str | Path | None) -> str | Path | None:
    """Return ``adapter``, or the index's adapter when neither a model nor an adapter is given."""
    if adapter is not None or model is not None:
        return adapter
    path = catalog["model"].get("adapter")
    if path and not Path(path).exists():
        raise StorageError(
            f"the index's adapter folder {path} no longer exists; pass --model and --adapter with the same model "
            "and adapter, they are checked by hash"
        )
    return path


def _load_index_model(catalog: dict, model: str | None, adapter: str | Path | None = None):
    """Load the query's model and adapter (default: the index's) and check them against the index's identity."""
    index_settings = IndexSettings.from_dict(catalog["index_settings"])
    loaded = load_model(model or _stored_model_path(catalog), dtype=index_settings.dtype,
                        adapter=_stored_adapter_path(catalog, model, adapter))
    renderer = Renderer(loaded.tokenizer, max_length=index_settings.max_length,
                        plain_template=index_settings.plain_template or None)
    check_identity(catalog["model"], loaded.identity(renderer.template_sha256))
    return loaded, renderer


def auto_candidates(budget_count: int, n_target_samples: int) -> int:
    """Return the nearest samples taken per target sample when --candidates is not given."""
    return max(AUTO_MIN_CANDIDATES, math.ceil(AUTO_CANDIDATE_FACTOR * budget_count / max(n_target_samples, 1)))


def _check_method(method: str, candidates, seed: int) -> None:
    if method not in METHODS:
        raise SettingsError(f"unknown selection method {method!r}: expected one of {', '.join(METHODS)}")
    if method != "trim" and candidates is not None:
        raise SettingsError(f"--approximate scores TRIM candidates only; drop it for --method {method}")
    if seed < 0:
        raise SettingsError(f"the random seed must be a non-negative integer, got {seed}")


def _query_baseline(store, catalog, tasks, budget, method, seed, settings: ScoreSettings,
                    selection: SelectionSettings, where, model, adapter, format, progress,
                    arguments, started: float) -> tuple[int, list]:
    """Score the tasks with a baseline method (trimdb.baselines), then select and write as for TRIM.

    The model is loaded for the embedding and less methods only. Baseline runs store no fingerprints.
    """
    samples = store.query("SELECT sample_key, sample_id FROM samples ORDER BY sample_key").fetchnumpy()
    sample_keys = np.asarray(samples["sample_key"], dtype=np.int64)
    sample_ids = np.asarray(samples["sample_id"], dtype=object)
    targets = {name: read_targets(name, path, format) for name, path in tasks.items()}
    encoder = _load_index_model(catalog, model, adapter) if method in ("embedding", "less") else None
    pool = BaselinePool(store, sample_keys, _allowed_samples(store, sample_keys, where), SCOPE_PARTS[settings.scope])
    cost = None
    if method == "less":
        scored, cost = score_less(pool, targets, encoder, seed=seed, progress=progress)
    else:
        scored = score_baseline(method, pool, targets, seed=seed, encoder=encoder, progress=progress)

    no_fingerprints = build_fingerprints([], [], [])
    results = [TaskResult(name, str(tasks[name]), len(targets[name]), scored[name].n_target_tokens, no_fingerprints)
               for name in tasks]
    scores = [scored[name].scores for name in tasks]
    selections = _select(store, results, scores, sample_keys, sample_ids, budget, selection)
    run_settings = settings.to_dict() | selection.to_dict() | {"method": method, "budget": list(budget), "where": where}
    if method == "random":
        run_settings["seed"] = seed
    if method == "less":
        run_settings |= {key: cost[key] for key in ("seed", "projection_dim", "lora_rank")}
    run_id = _write(store, results, scores, sample_keys, selections, run_settings, None, arguments or {}, started,
                    cost)
    return run_id, results


def _fingerprint_task(name, path, samples, loaded, renderer, settings: ScoreSettings) -> TaskResult:
    sequences, parts = [], []
    for sample in samples:
        try:
            rendered = renderer.render(sample.messages)
        except RenderError as error:
            raise InputError(sample.path, sample.line, None, str(error)) from error
        sequences.append(rendered.input_ids)
        parts.append(np.asarray(rendered.parts, dtype=np.int8))

    allowed = SCOPE_PARTS[settings.scope]
    classes, hidden, saliency, summaries = [], [], [], []
    for index, states in encode(loaded.model, sequences, batch_tokens=max(map(len, sequences)) * 4,
                                pad_id=loaded.pad_id, saliency=settings.saliency):
        in_scope = np.isin(parts[index], allowed)
        weights = blend_saliency(states.row, states.column, in_scope, settings.saliency)
        keep = np.flatnonzero(in_scope)
        keep = keep[keep > 0]  # position 0 is the attention sink and never counts
        classes.append(np.asarray(sequences[index], dtype=np.int64)[keep])
        hidden.append(states.hidden[keep])
        saliency.append(weights[keep])
        content = np.flatnonzero(parts[index] != TEMPLATE)
        summaries.append(unit_mean(states.hidden[content[content > 0]]))
    fingerprints = build_fingerprints(classes, hidden, saliency)
    if len(fingerprints) == 0:
        raise InputError(str(path), None, None, f"no target token is in scope {settings.scope!r}",
                         "use --scope all, or targets with content in that part")
    n_tokens = int(sum(len(c) for c in classes))
    log.info("task %s: %d targets, %d in-scope tokens, %d fingerprints", name, len(samples), n_tokens, len(fingerprints))
    return TaskResult(name, str(path), len(samples), n_tokens, fingerprints, summaries=summaries)


def _scan(store: Store, results: list[TaskResult], settings: ScoreSettings, where: str | None, progress: bool):
    """Score all tasks in one pass over the stored vectors; return per-task SampleScores.

    Memory stays bounded: vectors and their token rows are read in chunks of SCAN_CHUNK, and only
    per-sample accumulators (a few numbers per sample) live for the whole scan.
    """
    samples = store.query("SELECT sample_key, sample_id FROM samples ORDER BY sample_key").fetchnumpy()
    sample_keys = np.asarray(samples["sample_key"], dtype=np.int64)
    sample_ids = np.asarray(samples["sample_id"], dtype=object)
    allowed = _allowed_samples(store, sample_keys, where)
    accumulators = [SampleAccumulator(len(sample_keys)) for _ in results]
    scope = SCOPE_PARTS[settings.scope]

    bar = tqdm(total=sum(s.n_vectors for s in store.segments()), unit="tok", unit_scale=True, desc="score",
               disable=not progress)
    for segment in store.segments():
        for ids, vectors in store.iter_vectors(segment, SCAN_CHUNK):
            tokens = _token_rows(store, ids)
            slots = np.searchsorted(sample_keys, tokens["sample_key"])
            keep = np.isin(tokens["part"], scope) & allowed[slots]
            _score_chunk(results, settings, accumulators, vectors[keep], tokens["token_class"][keep], slots[keep])
            bar.update(len(ids))
    bar.close()
    scores = [a.finish(settings.mean_weight, settings.max_weight) for a in accumulators]
    return scores, sample_keys, sample_ids


def _scan_candidates(store: Store, results: list[TaskResult], settings: ScoreSettings, where, n_candidates: int):
    """Score exactly only the samples that the sample-summary index puts near some target sample."""
    samples = store.query("SELECT sample_key, sample_id FROM samples ORDER BY sample_key").fetchnumpy()
    sample_keys = np.asarray(samples["sample_key"], dtype=np.int64)
    sample_ids = np.asarray(samples["sample_id"], dtype=object)
    summaries = [summary for result in results for summary in result.summaries]
    keys = candidate_samples(store, summaries, n_candidates)
    keys = keys[_allowed_samples(store, sample_keys, where)[np.searchsorted(sample_keys, keys)]]
    accumulators = [SampleAccumulator(len(sample_keys)) for _ in results]
    scope = SCOPE_PARTS[settings.scope]

    store.raw.register("_trimdb_candidates", pa.table({"sample_key": pa.array(keys, pa.int64())}))
    try:
        rows = store.query(
            "SELECT token_key, sample_key, token_class, part FROM tokens "
            "WHERE sample_key IN (SELECT sample_key FROM _trimdb_candidates) ORDER BY token_key").fetchnumpy()
    finally:
        store.raw.unregister("_trimdb_candidates")
    token_keys = np.asarray(rows["token_key"], dtype=np.int64)
    keep = np.isin(np.asarray(rows["part"]), scope)
    slots = np.searchsorted(sample_keys, np.asarray(rows["sample_key"], dtype=np.int64))
    classes = np.asarray(rows["token_class"], dtype=np.int64)
    for start in range(0, len(token_keys), SCAN_CHUNK):
        part = slice(start, start + SCAN_CHUNK)
        vectors = store.read_tokens(token_keys[part])
        chunk_keep = keep[part]
        _score_chunk(results, settings, accumulators, vectors[chunk_keep], classes[part][chunk_keep],
                     slots[part][chunk_keep])
    scores = [a.finish(settings.mean_weight, settings.max_weight) for a in accumulators]
    return scores, sample_keys, sample_ids


def _score_chunk(results: list[TaskResult], settings: ScoreSettings, accumulators: list[SampleAccumulator],
                 vectors: np.ndarray, token_classes: np.ndarray, slots: np.ndarray) -> None:
    """Score one chunk of in-scope tokens for every task and add them to the task's accumulator."""
    for result, accumulator in zip(results, accumulators):
        token_scores, unseen = score_tokens(vectors, token_classes, result.fingerprints, settings.unseen_penalty,
                                            matmul=token_similarities)
        accumulator.add(slots, token_scores, unseen)


def token_similarities(vectors: np.ndarray, fingerprints: np.ndarray) -> np.ndarray:
    """Return ``vectors @ fingerprints.T`` (n, F): on the GPU when torch sees one, else NumPy's BLAS."""
    # NOTE: the CUDA branch has not run in CI, which has no GPU; the benchmark's gpu.py exercises it.
    if torch.cuda.is_available() and len(vectors) >= GPU_MIN_ROWS:
        product = torch.from_numpy(vectors).cuda() @ torch.from_numpy(fingerprints).cuda().T
        return product.cpu().numpy()
    return vectors @ fingerprints.T


def _check_where(store: Store, where: str | None) -> None:
    """Raise SettingsError when ``where`` is not valid SQL over sample_info or keeps no sample."""
    if where is None:
        return
    try:
        n_kept = store.query(f"SELECT count(*) FROM sample_info WHERE {where}").fetchall()[0][0]
    except duckdb.Error as error:
        raise SettingsError(_where_message(where, error)) from error
    if n_kept == 0:
        raise SettingsError(
            f"--where {where!r} keeps none of the indexed samples, so the query would store an empty coreset. "
            f"Count what a condition keeps with: trimdb sql --db {store.path} "
            '"SELECT count(*) FROM sample_info WHERE ..."'
        )


def _where_message(where: str, error: duckdb.Error) -> str:
    return (f"invalid --where condition {where!r}: {str(error).splitlines()[0]}; it is SQL over the sample_info "
            "view (sample_id, source, path, line, n_turns, n_tokens, truncated, record)")


def _allowed_samples(store: Store, sample_keys: np.ndarray, where: str | None) -> np.ndarray:
    """Return a mask over sample slots: the samples that ``where`` (SQL over sample_info) keeps."""
    if where is None:
        return np.ones(len(sample_keys), dtype=bool)
    try:
        kept = store.query(f"SELECT sample_key FROM sample_info WHERE {where}").fetchnumpy()["sample_key"]
    except duckdb.Error as error:
        raise SettingsError(_where_message(where, error)) from error
    log.info("--where keeps %d of %d samples", len(kept), len(sample_keys))
    return np.isin(sample_keys, np.asarray(kept, dtype=np.int64))


def _token_rows(store: Store, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Return sample_key, token_class and part of consecutive token keys ``ids``, in key order."""
    rows = store.query(
        "SELECT token_key, sample_key, token_class, part FROM tokens WHERE token_key BETWEEN ? AND ? ORDER BY token_key",
        [int(ids[0]), int(ids[-1])]).fetchnumpy()
    if not np.array_equal(np.asarray(rows["token_key"], dtype=np.int64), ids):
        raise StorageError(
            f"{store.path}: a vector segment contains token keys {ids[0]}..{ids[-1]} that do not match the tokens "
            "table; rebuild the index"
        )
    return {"sample_key": np.asarray(rows["sample_key"], dtype=np.int64),
            "token_class": np.asarray(rows["token_class"], dtype=np.int64),
            "part": np.asarray(rows["part"])}


@dataclass
class _Selections:
    """Per-task rankings and selections, the combined coreset, and what deduplication removed."""

    orders: list[np.ndarray]
    chosen: list[list[int]]
    removed: list[tuple[str | None, Removal]]
    combined: list[CombinedPick]


def _select(store, results, scores, sample_keys, sample_ids, budget, selection: SelectionSettings,
            pool_size: int | None = None) -> _Selections:
    """Rank and select each task and the combined coreset.

    A fractional budget is a share of ``pool_size`` (the samples that --where keeps) when given,
    else of the scored samples; the approximate path scores only candidates, so it passes it.
    """
    orders = [rank_samples(task_scores.score, sample_ids) for task_scores in scores]
    deduplicator = _deduplicator_factory(store, sample_keys, selection)
    chosen, removed = [], []
    for result, order in zip(results, orders):
        quota = min(len(order), budget_size(budget, pool_size or len(order)))
        picks, dropped = select_ranked(order, quota, deduplicator())
        chosen.append(picks)
        removed += [(result.task, removal) for removal in dropped]
        result.n_scored, result.n_selected = len(order), len(picks)

    n_scored = len(np.unique(np.concatenate(orders))) if orders else 0
    total = min(n_scored, budget_size(budget, pool_size or n_scored))
    quotas = split_budget(total, selection.split,
                          {result.task: result.n_targets for result in results})
    rankings = {result.task: order for result, order in zip(results, orders)}
    combined, dropped = combine_rankings(rankings, quotas, deduplicator())
    removed += [(None, removal) for removal in dropped]
    if removed:
        log.info("deduplication kept %d samples out of the selections", len(removed))
    return _Selections(orders, chosen, removed, combined)


def _deduplicator_factory(store: Store, sample_keys: np.ndarray, selection: SelectionSettings):
    """Return a function that makes a fresh Deduplicator (or None) for one selection."""
    if not selection.exact_dedup and selection.near_dedup_threshold is None:
        return lambda: None
    text_hashes = None
    if selection.exact_dedup:
        rows = store.query("SELECT sample_key, text_hash FROM samples ORDER BY sample_key").fetchall()
        text_hashes = [text_hash for _, text_hash in rows]
    embedding = None
    if selection.near_dedup_threshold is not None:
        ranges = store.query(
            "SELECT sample_key, min(token_key), count(*) FROM tokens GROUP BY sample_key ORDER BY sample_key").fetchall()
        spans = {key: (first, count) for key, first, count in ranges}
        cache: dict[int, np.ndarray] = {}

        def embedding(slot: int) -> np.ndarray:
            if slot not in cache:
                first, count = spans[int(sample_keys[slot])]
                mean = store.read_token_range(first, count).mean(axis=0)
                cache[slot] = mean / max(float(np.linalg.norm(mean)), 1e-12)
            return cache[slot]

    return lambda: Deduplicator(text_hashes, selection.near_dedup_threshold, embedding)


def _write(store, results, scores: list[SampleScores], sample_keys, selections: _Selections, run_settings,
           loaded, arguments, started: float, cost: dict | None = None) -> int:
    """Write a query run in one transaction; ``started`` is the perf_counter time at which the query began."""
    with store.transaction() as connection:
        run_id = store.start_run(connection, "query", arguments, run_settings)
        for index, (result, task_scores) in enumerate(zip(results, scores)):
            _write_scores(store, connection, run_id, result.task, task_scores, sample_keys, selections.orders[index])
            picks = selections.chosen[index]
            store.insert_arrow(connection, "selections", pa.table({
                "run_id": pa.array([run_id] * len(picks), pa.int32()),
                "task": [result.task] * len(picks),
                "rank": pa.array(np.arange(1, len(picks) + 1), pa.int32()),
                "sample_key": pa.array(sample_keys[picks], pa.int64()),
            }))
            if len(result.fingerprints):
                _write_fingerprints(store, connection, run_id, result, loaded.tokenizer)
            connection.execute(
                "INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [run_id, result.task, result.target_path, result.n_targets, result.n_target_tokens,
                 len(result.fingerprints), result.n_scored, result.n_selected],
            )
        _write_combined(store, connection, run_id, selections, sample_keys)
        stats = {r.task: {"n_scored": r.n_scored, "n_selected": r.n_selected,
                          "n_unscored": int(len(sample_keys) - r.n_scored)} for r in results}
        stats["combined"] = {"n_selected": len(selections.combined)}
        for reason in ("exact", "near"):
            stats["combined"][f"n_removed_{reason}"] = sum(
                1 for task, removal in selections.removed if task is None and removal.reason == reason)
        if cost is not None:
            stats["cost"] = cost  # seconds and estimated FLOPs of a method that runs the model over the pool
        stats["seconds"] = round(time.perf_counter() - started, 3)
        store.finish_run(connection, run_id, stats)
    return run_id


def _write_combined(store, connection, run_id, selections: _Selections, sample_keys) -> None:
    combined = selections.combined
    store.insert_arrow(connection, "coresets", pa.table({
        "run_id": pa.array([run_id] * len(combined), pa.int32()),
        "rank": pa.array(np.arange(1, len(combined) + 1), pa.int32()),
        "sample_key": pa.array([int(sample_keys[pick.index]) for pick in combined], pa.int64()),
        "task": [pick.task for pick in combined],
        "task_rank": pa.array([pick.task_rank for pick in combined], pa.int32()),
    }))
    removed = selections.removed
    store.insert_arrow(connection, "removed", pa.table({
        "run_id": pa.array([run_id] * len(removed), pa.int32()),
        "task": pa.array([task for task, _ in removed], pa.string()),
        "sample_key": pa.array([int(sample_keys[r.index]) for _, r in removed], pa.int64()),
        "reason": pa.array([r.reason for _, r in removed], pa.string()),
        "duplicate_of": pa.array([int(sample_keys[r.duplicate_of]) for _, r in removed], pa.int64()),
        "similarity": pa.array([r.similarity for _, r in removed], pa.float64()),
    }))


def _write_scores(store, connection, run_id, task, task_scores: SampleScores, sample_keys, order) -> None:
    store.insert_arrow(connection, "scores", pa.table({
        "run_id": pa.array([run_id] * len(order), pa.int32()),
        "task": [task] * len(order),
        "sample_key": pa.array(sample_keys[order], pa.int64()),
        "score": task_scores.score[order],
        "mean_part": task_scores.mean_part[order],
        "max_part": task_scores.max_part[order],
        "unseen_share": task_scores.unseen_share[order],
        "n_tokens": pa.array(task_scores.count[order], pa.int32()),
        "rank": pa.array(np.arange(1, len(order) + 1), pa.int32()),
    }))


def _write_fingerprints(store, connection, run_id, result: TaskResult, tokenizer) -> None:
    fingerprints = result.fingerprints
    n = len(fingerprints)
    store.insert_arrow(connection, "fingerprints", pa.table({
        "run_id": pa.array([run_id] * n, pa.int32()),
        "task": [result.task] * n,
        "token_class": pa.array(fingerprints.classes, pa.int32()),
        "token_text": tokenizer.convert_ids_to_tokens([int(c) for c in fingerprints.classes]),
        "n_occurrences": pa.array(fingerprints.occurrences, pa.int32()),
        "saliency_sum": pa.array(fingerprints.saliency_sums, pa.float32()),
        "vector": pa.array(list(fingerprints.vectors), pa.list_(pa.float32())),
    }))


def summarize_task(store: Store, run_id: int, task: str, top: int = 10) -> dict:
    """Return the top samples, score and length quantiles and source mix of one task's coreset."""
    top_rows = store.query(
        "SELECT rank, sample_id, source, score, n_tokens, record FROM scored "
        "WHERE run_id = ? AND task = ? AND selected ORDER BY rank LIMIT ?", [run_id, task, top]).fetchall()
    quantiles = "quantile_cont({0}, [0, 0.1, 0.5, 0.9, 1])"
    stats = store.query(
        f"SELECT selected, count(*), {quantiles.format('score')}, {quantiles.format('n_tokens')} FROM scored "
        "WHERE run_id = ? AND task = ? GROUP BY selected", [run_id, task]).fetchall()
    mix = store.query(
        "SELECT source, count(*) FILTER (WHERE selected) AS coreset, count(*) AS pool FROM scored "
        "WHERE run_id = ? AND task = ? GROUP BY source ORDER BY coreset DESC, source", [run_id, task]).fetchall()
    return {
        "top": [dict(zip(("rank", "sample_id", "source", "score", "n_tokens", "record"), row)) for row in top_rows],
        "distribution": {bool(row[0]): {"count": row[1], "score": row[2], "n_tokens": row[3]} for row in stats},
        "source_mix": [dict(zip(("source", "coreset", "pool"), row)) for row in mix],
    }


def preview_text(record_json: str, width: int = 80) -> str:
    """Return the first user text of a stored record, flattened to one line of at most ``width`` characters."""
    text = " ".join(str(record_json).split())
    try:
        record = json.loads(record_json)
        for key in ("instruction", "prompt", "question"):
            if isinstance(record.get(key), str):
                text = " ".join(record[key].split())
                break
        else:
            turns = record.get("messages") or record.get("conversations") or []
            if turns and isinstance(turns[0], dict):
                first = turns[0].get("content") or turns[0].get("value") or ""
                text = " ".join(str(first).split())
    except (ValueError, AttributeError):
        pass
    return text if len(text) <= width else text[: width - 1] + "…"
