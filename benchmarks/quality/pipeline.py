"""Run the quality benchmark's stages in order and collect every figure into one results dict.

Stages, in order:
1. data: pool, targets and held-out evaluation sets (benchmarks.quality.data);
2. index: one cached index of the pool, shared by every method;
3. methods: TRIM with default settings and each baseline, one query run each;
4. relevance and coreset lengths at each budget;
5. ablations of TRIM's settings, and TRIM after a `trimdb warmup` adapter (a second index);
6. downstream: LoRA fine-tunes on each 5% coreset, held-out loss and GSM8K accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import resource
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.quality.data import RELATED, Dataset, PoolSpec, build_dataset, is_related
from benchmarks.quality.methods import (
    RANDOM_SEEDS, IndexInfo, MethodRun, available_methods, coreset, ensure_index, read_pool, read_rankings, run_method,
)
from benchmarks.quality.metrics import coreset_lengths, index_flops, length_stats, query_flops, relevance, source_mix
from benchmarks.quality.training import TrainSettings, evaluate, fine_tune
from trimdb.models import WARMUP_RECORD, load_model
from trimdb.settings import IndexSettings, SaliencySettings, ScoreSettings
from trimdb.warmup import resolve_settings, warmup

log = logging.getLogger(__name__)

BUDGETS = (0.01, 0.05)
DOWNSTREAM_BUDGET = 0.05


@dataclass
class Config:
    """What one benchmark run builds, measures and trains."""

    mode: str
    work: Path
    pool: PoolSpec
    index: IndexSettings
    train: TrainSettings
    model: str | None = None
    n_accuracy: int = 0
    max_new_tokens: int = 96
    warmup_ablation: bool = True
    # Number of the best ablation settings (by mean relevance) that also get the downstream test.
    downstream_ablations: int = 0
    full_pool_training: bool = False
    bigbench: bool = True
    methods: tuple[str, ...] | None = None  # None: every available method
    layer_values: tuple[int, ...] = (1, 2, 8)
    ablations: tuple[str, ...] | None = None  # None: every variant of ablation_settings
    # TRIM's settings in the headline table; every ablation changes one of them.
    base_settings: ScoreSettings = field(default_factory=ScoreSettings)
    progress: bool = False


# Ablation variants by the setting they change; every group also contains "default".
ABLATION_GROUPS = {
    "row saliency": ("default", "row saliency inverse"),
    "layers L": ("default", "L = 1", "L = 2", "L = 8"),
    "unseen penalty λ": ("λ = 0.25", "λ = 0.5", "default", "λ = 1.0"),
    "scope": ("default", "scope response", "scope prompt"),
    "pooling (mean, max)": ("default", "pooling mean only", "pooling max only"),
    "saliency blend (row, column)": ("default", "saliency row only", "saliency column only"),
    "warmup": ("default", "with warmup"),
}
# Values of the unseen-class penalty that the ablations try, besides the base setting's.
UNSEEN_PENALTIES = (0.25, 0.5, 1.0)
# The variant that takes every group's winner at once (warmup excepted: it needs its own index).
COMBINED = "combined winners"


def ablation_settings(base: ScoreSettings, layer_values: tuple[int, ...], num_layers: int) -> dict[str, ScoreSettings]:
    """Return the ablation variants of TRIM: each changes one setting of ``base``."""
    default_saliency = base.saliency
    saliency = lambda **kw: dataclasses.replace(base, saliency=dataclasses.replace(default_saliency, **kw))  # noqa: E731
    variants = {"default": base, "row saliency inverse": saliency(row_saliency="inverse")}
    for layers in layer_values:
        if layers <= num_layers and layers != default_saliency.layers:
            variants[f"L = {layers}"] = saliency(layers=layers)
    for penalty in UNSEEN_PENALTIES:
        if penalty != base.unseen_penalty:
            variants[f"λ = {penalty}"] = dataclasses.replace(base, unseen_penalty=penalty)
    variants |= {
        "scope response": dataclasses.replace(base, scope="response"),
        "scope prompt": dataclasses.replace(base, scope="prompt"),
        "pooling mean only": dataclasses.replace(base, mean_weight=1.0, max_weight=0.0),
        "pooling max only": dataclasses.replace(base, mean_weight=0.0, max_weight=1.0),
        "saliency row only": saliency(row_weight=1.0, column_weight=0.0),
        "saliency column only": saliency(row_weight=0.0, column_weight=1.0),
    }
    return variants


@dataclass
class Benchmark:
    """State shared by the stages: paths, the dataset, the index and the results so far."""

    config: Config
    dataset: Dataset
    pool_path: Path
    targets: dict[str, Path]
    results: dict = field(default_factory=dict)
    index: IndexInfo | None = None
    pool: dict[str, dict] = field(default_factory=dict)
    runs: list[MethodRun] = field(default_factory=list)
    rankings: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    # Ablation name -> (task rankings, the pool description of the index they came from).
    ablation_rankings: dict[str, tuple[dict, dict]] = field(default_factory=dict)

    def save(self) -> None:
        (self.config.work / "results.json").write_text(json.dumps(self.results, indent=2, default=str))


def run_benchmark(config: Config, dataset: Dataset | None = None, *, machine: dict | None = None,
                  command: str = "") -> dict:
    """Run every stage and return the results dict (also written to ``work/results.json``).

    ``machine`` (benchmarks.perf.machine.describe_machine) and ``command`` are stored for the page.
    """
    started = time.perf_counter()
    config.work.mkdir(parents=True, exist_ok=True)
    if dataset is None:
        dataset = build_dataset(config.pool, bigbench=config.bigbench)
    pool_path, targets = dataset.write(config.work / "data")
    bench = Benchmark(config, dataset, pool_path, targets)
    bench.results = {"mode": config.mode, "command": command, "machine": machine or {},
                     "config": _config_dict(config), "notes": list(dataset.notes), "splits": dataset.splits,
                     "timings": {}}
    for name, stage in (("index", stage_index), ("methods", stage_methods), ("relevance", stage_relevance),
                        ("ablations", stage_ablations), ("downstream", stage_downstream)):
        stage_started, cpu_started = time.perf_counter(), _cpu_seconds()
        stage(bench)
        bench.results["timings"][name] = time.perf_counter() - stage_started
        bench.results.setdefault("cpu_timings", {})[name] = _cpu_seconds() - cpu_started
        bench.save()
        log.info("stage %s done in %.1f s", name, bench.results["timings"][name])
    bench.results["seconds"] = time.perf_counter() - started
    bench.results["cpu_seconds"] = _cpu_seconds()
    bench.save()
    return bench.results


def _cpu_seconds() -> float:
    """Return the user and system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _config_dict(config: Config) -> dict:
    values = dataclasses.asdict(config)
    values["work"] = str(config.work)
    return values


def stage_index(bench: Benchmark) -> None:
    """Index the pool (or reuse the cached index) and describe the pool and the model."""
    config = bench.config
    bench.index = ensure_index(config.work / "pool.duckdb", bench.pool_path, config.index, model=config.model,
                               progress=config.progress)
    bench.pool = read_pool(bench.index.db)
    loaded = load_model(config.model, dtype=config.index.dtype)
    model_config = loaded.model.config
    bench.results["model"] = {
        "name": loaded.name, "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "hidden_size": int(model_config.hidden_size), "num_layers": int(model_config.num_hidden_layers),
    }
    bench.results["index"] = dataclasses.asdict(bench.index) | {"db": str(bench.index.db)}
    bench.results["pool"] = _describe_pool(bench)


def _describe_pool(bench: Benchmark) -> dict:
    sources: dict[str, int] = {}
    for info in bench.pool.values():
        sources[info["source"]] = sources.get(info["source"], 0) + 1
    related = {}
    for target in RELATED:
        matched = sorted({f"{i['source']}:{i['task']}" for i in bench.pool.values() if is_related(target, i)})
        related[target] = {"n": sum(is_related(target, i) for i in bench.pool.values()), "tasks": matched}
    lengths = length_stats([info["n_tokens"] for info in bench.pool.values()])
    return {"n": len(bench.pool), "sources": sources, "related": related, "lengths": lengths,
            "targets": {t: len(r) for t, r in bench.dataset.targets.items()},
            "evals": {t: len(r) for t, r in bench.dataset.evals.items()}}


def stage_methods(bench: Benchmark) -> None:
    """Run TRIM and each available baseline once over all target tasks."""
    config = bench.config
    methods = list(config.methods) if config.methods is not None else ["trim", *available_methods()]
    bench.results["methods"] = {"available": methods, "offered": available_methods(), "failed": {}}
    plan = []
    for method in methods:
        seeds = RANDOM_SEEDS if method == "random" else (0,)
        plan += [(f"random (seed {seed})" if method == "random" else method, method, seed) for seed in seeds]
    for label, method, seed in plan:
        try:
            run = run_method(bench.index.db, bench.targets, label, method, seed=seed, settings=config.base_settings,
                             progress=config.progress)
        except Exception as error:  # a baseline under development must not stop the benchmark
            if method == "trim":
                raise
            log.error("method %s failed: %s", label, traceback.format_exc())
            bench.results["methods"]["failed"][label] = f"{type(error).__name__}: {error}"
            continue
        bench.runs.append(run)
        bench.rankings[label] = read_rankings(bench.index.db, run.run_id)
    bench.results["runs"] = [_run_dict(bench, run) for run in bench.runs]


def _run_dict(bench: Benchmark, run: MethodRun) -> dict:
    params = bench.results["model"]["parameters"]
    hidden = bench.results["model"]["hidden_size"]
    return {"label": run.label, "method": run.method, "run_id": run.run_id, "seconds": run.seconds,
            "flops": query_flops(run, bench.index, params, hidden), "stats": run.stats}


def stage_relevance(bench: Benchmark) -> None:
    """Compute relevance, source mix and coreset lengths of every method, target and budget."""
    table = {}
    for label, rankings in bench.rankings.items():
        table[label] = {}
        for target, ranking in rankings.items():
            table[label][target] = {
                str(budget): relevance(ranking, bench.pool, target, budget)
                | {"mix": source_mix(ranking, bench.pool, budget),
                   "lengths": length_stats(coreset_lengths(ranking, bench.pool, budget))}
                for budget in BUDGETS
            }
    bench.results["relevance"] = table
    bench.results["index"]["flops"] = index_flops(bench.index, bench.results["model"]["parameters"])
    bench.results["coreset_lengths"] = {
        label: {target: coreset_lengths(ranking, bench.pool, DOWNSTREAM_BUDGET) for target, ranking in rankings.items()}
        for label, rankings in bench.rankings.items()
    }
    bench.results["pool_lengths"] = [info["n_tokens"] for info in bench.pool.values()]


def stage_ablations(bench: Benchmark) -> None:
    """Run each TRIM variant and, where enabled, TRIM over an index built with a warmup adapter."""
    config = bench.config
    variants = ablation_settings(config.base_settings, config.layer_values, bench.results["model"]["num_layers"])
    if config.ablations is not None:
        variants = {name: s for name, s in variants.items() if name == "default" or name in config.ablations}
    table, rankings = {}, {}
    for name, settings in variants.items():
        if name == "default":
            ranking = bench.rankings["trim"]
            seconds = next(run.seconds for run in bench.runs if run.label == "trim")
        else:
            run = run_method(bench.index.db, bench.targets, f"trim: {name}", "trim", settings=settings,
                             progress=config.progress)
            ranking, seconds = read_rankings(bench.index.db, run.run_id), run.seconds
        rankings[name] = (ranking, bench.pool)
        table[name] = _ablation_row(ranking, bench.pool, seconds)
    combined = combine_winners(config.base_settings, variants, table)
    if combined is not None:
        run = run_method(bench.index.db, bench.targets, f"trim: {COMBINED}", "trim", settings=combined,
                         progress=config.progress)
        ranking = read_rankings(bench.index.db, run.run_id)
        rankings[COMBINED] = (ranking, bench.pool)
        table[COMBINED] = _ablation_row(ranking, bench.pool, run.seconds) | {"settings": combined.to_dict()}
    if config.warmup_ablation:
        ranking, pool, row = _warmup_ablation(bench)
        rankings["with warmup"] = (ranking, pool)
        table["with warmup"] = row
    bench.results["ablations"] = table
    bench.ablation_rankings = rankings


def group_winner(names: tuple[str, ...], rows: dict) -> str | None:
    """Return the best variant of one group by mean relevance averaged over both budgets; the default wins ties.

    Both budgets count alike: a setting that gains at 5% but loses its 1% coreset is no winner.
    Returns None when fewer than two of the group's variants ran.
    """
    present = [name for name in names if name in rows]
    if len(present) < 2:
        return None
    return max(present, key=lambda n: (round(sum(rows[n]["mean"][str(b)] for b in BUDGETS) / len(BUDGETS), 6),
                                       n == "default"))


def combine_winners(base: ScoreSettings, variants: dict[str, ScoreSettings], rows: dict) -> ScoreSettings | None:
    """Return ``base`` with the change of every group's winning variant, or None when fewer than two won.

    The groups change disjoint fields, so the changes apply one after another.
    """
    winners = [group_winner(names, rows) for group, names in ABLATION_GROUPS.items() if group != "warmup"]
    winners = [name for name in winners if name not in (None, "default")]
    if len(winners) < 2:
        return None
    combined = base
    for name in winners:
        changed = variants[name]
        saliency = {key: value for key, value in dataclasses.asdict(changed.saliency).items()
                    if value != getattr(base.saliency, key)}
        fields = {key: getattr(changed, key) for key in ("scope", "unseen_penalty", "mean_weight", "max_weight")
                  if getattr(changed, key) != getattr(base, key)}
        combined = dataclasses.replace(combined, saliency=dataclasses.replace(combined.saliency, **saliency), **fields)
    return combined


def _ablation_row(ranking: dict[str, list[str]], pool: dict[str, dict], seconds: float) -> dict:
    row = {"seconds": seconds}
    for target, task_ranking in ranking.items():
        row[target] = {str(b): relevance(task_ranking, pool, target, b)["share"] for b in BUDGETS}
    row["mean"] = {str(b): sum(row[t][str(b)] for t in ranking) / len(ranking) for b in BUDGETS}
    return row


def _warmup_ablation(bench: Benchmark):
    """Warm the model up on a random 5% of the pool, index the pool with the adapter, and run TRIM."""
    config = bench.config
    adapter = config.work / "warmup-adapter"
    preset_name, settings = resolve_settings("cpu", dtype=config.index.dtype, max_length=config.index.max_length,
                                             seed=config.train.seed)
    if not (adapter / WARMUP_RECORD).exists():
        warmup([bench.pool_path], adapter, model=config.model, settings=settings, progress=config.progress)
    # The adapter's record keeps the training time, which a rerun that reuses the adapter reports too.
    warmup_seconds = json.loads((adapter / WARMUP_RECORD).read_text())["seconds"]
    index = ensure_index(config.work / "pool-warmup.duckdb", bench.pool_path, config.index, model=config.model,
                         adapter=str(adapter), progress=config.progress)
    run = run_method(index.db, bench.targets, "trim: with warmup", "trim", settings=config.base_settings,
                     progress=config.progress)
    pool = read_pool(index.db)
    row = _ablation_row(read_rankings(index.db, run.run_id), pool, run.seconds)
    row |= {"warmup_seconds": warmup_seconds, "index_seconds": index.seconds, "preset": preset_name,
            "warmup_settings": settings.to_dict()}
    return read_rankings(index.db, run.run_id), pool, row


def stage_downstream(bench: Benchmark) -> None:
    """Fine-tune on each 5% coreset and evaluate on the target's held-out set; add the references."""
    config = bench.config
    adapters = config.work / "adapters"
    evals = bench.dataset.evals
    records = {sample_id: json.loads(info["record"]) for sample_id, info in bench.pool.items()}
    table: dict[str, dict] = {"untuned": {}}
    for target, eval_records in evals.items():
        table["untuned"][target] = _evaluation(config, eval_records, None, target)

    candidates = [(run.label, bench.rankings[run.label]) for run in bench.runs]
    candidates += _top_ablations(bench)
    for label, rankings in candidates:
        table[label] = {}
        for target, ranking in rankings.items():
            chosen = [records[sample_id] for sample_id in coreset(ranking, DOWNSTREAM_BUDGET, len(bench.pool))]
            tuned = fine_tune(chosen, adapters, config.train, config.model, config.progress)
            table[label][target] = _evaluation(config, evals[target], tuned.adapter, target) | {
                "train_seconds": tuned.seconds, "n_steps": tuned.n_steps, "n_samples": tuned.n_samples,
                "first_loss": tuned.first_loss, "last_loss": tuned.last_loss}
            bench.results["downstream"] = table
            bench.save()
    if config.full_pool_training:
        tuned = fine_tune(list(records.values()), adapters, dataclasses.replace(config.train, max_steps=None),
                          config.model, config.progress)
        table["full pool"] = {target: _evaluation(config, evals[target], tuned.adapter, target)
                              | {"train_seconds": tuned.seconds, "n_steps": tuned.n_steps} for target in evals}
    bench.results["downstream"] = table


def _evaluation(config: Config, records: list[dict], adapter, target: str) -> dict:
    """Evaluate the model with ``adapter`` on ``records``, or reuse the cached result for the same inputs.

    Adapters live in folders named by a hash of their training inputs, so the folder name stands
    for the adapter in the cache key.
    """
    n_accuracy = config.n_accuracy if target == "gsm8k" else 0
    inputs = {"records": records, "adapter": adapter.name if adapter else None, "model": config.model,
              "train": dataclasses.asdict(config.train), "n_accuracy": n_accuracy,
              "max_new_tokens": config.max_new_tokens}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    cached = config.work / "evaluations" / f"{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    result = dataclasses.asdict(evaluate(records, config.model, adapter, config.train, n_accuracy,
                                         config.max_new_tokens))
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result))
    return result


def _top_ablations(bench: Benchmark) -> list[tuple[str, dict]]:
    """Return the combined winners, then the best other ablation variants by mean relevance over both
    budgets, for the downstream test."""
    count = bench.config.downstream_ablations
    if count <= 0:
        return []
    rows = bench.results["ablations"]
    ranked = sorted((name for name in rows if name != "default"),
                    key=lambda name: (name != COMBINED, -sum(rows[name]["mean"][str(b)] for b in BUDGETS)))
    # The warmup variant is ranked on its own index, whose sample ids are the same pool's.
    return [(f"trim: {name}", bench.ablation_rankings[name][0]) for name in ranked[:count]]
