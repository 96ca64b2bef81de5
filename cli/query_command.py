"""`trimdb query`: score the indexed pool for target tasks and store the coresets."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from cli.options import adapter_option, db_option, format_option, model_option, progress_option, score_options
from trimdb.query import preview_text, query_tasks, summarize_task
from trimdb.records import list_corpus_files
from trimdb.selection import parse_split
from trimdb.settings import METHODS, SaliencySettings, ScoreSettings, SelectionSettings
from trimdb.store import Store


def parse_task(ctx, param, values) -> dict[str, str]:
    tasks: dict[str, str] = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator and Path(value).is_dir():
            pairs = [(file.name.split(".")[0], str(file)) for file in list_corpus_files([value])]
            if not pairs:
                raise click.BadParameter(f"folder {value} contains no .jsonl, .json or .parquet target files", param=param)
        elif not separator or not name or not path:
            raise click.BadParameter(
                f"{value!r} is not NAME=FILE or a folder of target files, for example gsm8k=targets/gsm8k.jsonl",
                param=param)
        else:
            pairs = [(name, path)]
        for name, path in pairs:
            if name in tasks:
                raise click.BadParameter(f"task {name!r} is given twice", param=param)
            tasks[name] = path
    return tasks


def parse_dedup(ctx, param, values) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


@click.command()
@db_option
@click.option("--task", "tasks", multiple=True, required=True, callback=parse_task, metavar="NAME=FILE|FOLDER",
              help="Target task: a name and a file (or folder) of 5 to 10 target samples, or a folder with one "
                   "file per task, named by file name. Repeat for several tasks.")
@click.option("--budget", required=True, metavar="PERCENT%|COUNT",
              help="Coreset size per task: a share of the pool such as 5% or a sample count such as 500.")
@click.option("--split", default="equal", show_default=True, metavar="equal|proportional|NAME=W,...",
              help="How the combined coreset of several tasks shares the budget: equally, in proportion to each "
                   "task's number of target samples, or by the given weights.")
@click.option("--dedup", multiple=True, type=click.Choice(["exact", "near"]), callback=parse_dedup,
              help="Keep duplicates out of the coresets: exact (same normalized text) and/or near (cosine of "
                   "mean-pooled token vectors at or above --near-threshold). Repeatable.")
@click.option("--near-threshold", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
              help="Cosine at which --dedup near treats two samples as duplicates.")
@click.option("--where", default=None, metavar="SQL",
              help="Score only the samples that this SQL condition over the sample_info view keeps, for example "
                   "\"source <> 'sharegpt' AND n_tokens < 512\". The budget applies to the samples kept.")
@click.option("--exact/--approximate", default=True, show_default=True,
              help="Scan every stored token vector, or score exactly only the candidates that the sample-summary "
                   "index (built by `trimdb ann`) puts near the target samples.")
@click.option("--candidates", type=click.IntRange(min=1), default=None,
              help="With --approximate: nearest samples taken per target sample. Default: four times the "
                   "budget's sample count divided by the task's target samples, at least 100.")
@click.option("--method", type=click.Choice(METHODS), default="trim", show_default=True,
              help="Selection method: trim, or a baseline that writes the same tables: random (seeded uniform "
                   "scores), bm25 (lexical, max over target samples), embedding (cosine of mean hidden states, "
                   "max over target samples) or less (cosine of projected LoRA gradients, max over target "
                   "samples; runs a forward and a backward pass over every pool sample).")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Seed of --method random, or of the LoRA and the random projection of --method less. "
                   "Default: 0.")
@model_option
@adapter_option
@format_option
@score_options
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="Number of top samples to print per task.")
@progress_option
def query(db, tasks, budget, split, dedup, near_threshold, where, exact, candidates, method, seed, model, adapter, record_format, scope, unseen_penalty, row_weight, column_weight,
          mean_weight, max_weight, layers, row_saliency, top, progress):
    """Score every indexed sample for each --task and store the ranked coreset.

    Only the target samples go through the model; the pool is scored from the vectors that
    `trimdb index` stored. Results go to the scores, selections and fingerprints tables.

    \b
    trimdb query --db pool.duckdb --task gsm8k=gsm8k.jsonl --budget 5%
    trimdb query --db pool.duckdb --task mmlu=mmlu.jsonl --budget 200 --scope response
    trimdb query --db pool.duckdb --task gsm8k=gsm8k.jsonl --budget 5% --method bm25
    """
    settings = ScoreSettings(
        saliency=SaliencySettings(layers=layers, row_saliency=row_saliency, row_weight=row_weight,
                                  column_weight=column_weight),
        scope=scope, unseen_penalty=unseen_penalty, mean_weight=mean_weight, max_weight=max_weight,
    )
    selection = SelectionSettings(
        split=parse_split(split, list(tasks)), exact_dedup="exact" in dedup,
        near_dedup_threshold=near_threshold if "near" in dedup else None,
    )
    arguments = {"tasks": tasks, "budget": budget, "model": model, "adapter": adapter, "format": record_format, "method": method}
    if seed is not None and method not in ("random", "less"):
        raise click.UsageError("--seed applies only with --method random or less")
    if exact and candidates is not None:
        raise click.UsageError("--candidates applies only with --approximate")
    approximate = None if exact else (candidates or "auto")
    result = query_tasks(db, tasks, budget, settings=settings, selection=selection, where=where,
                         candidates=approximate, model=model, adapter=adapter,
                         format=record_format, progress=progress, arguments=arguments, method=method,
                         seed=seed or 0)
    console = Console()
    with Store(db, read_only=True) as store:
        for task in result.tasks:
            _print_task(console, task, summarize_task(store, result.run_id, task.task, top))
        _print_combined(console, store, result.run_id, len(result.tasks))
    console.print(f"run {result.run_id} took {result.seconds:.1f} s. Explore it with SQL, for example:")
    first = result.tasks[0].task
    console.print(f"  trimdb sql --db {db} \"SELECT rank, source, score, n_tokens FROM selected WHERE task = '{first}' LIMIT 20\"",
                  highlight=False, soft_wrap=True)
    console.print(f"  trimdb export --db {db} --task {first} -o {first}-coreset.jsonl", highlight=False, soft_wrap=True)


def _print_combined(console: Console, store: Store, run_id: int, n_tasks: int) -> None:
    per_task = store.query(
        "SELECT task, count(*) FROM coresets WHERE run_id = ? GROUP BY task ORDER BY task", [run_id]).fetchall()
    removed = store.query(
        "SELECT coalesce(task, 'combined'), reason, count(*) FROM removed WHERE run_id = ? GROUP BY ALL ORDER BY ALL",
        [run_id]).fetchall()
    if n_tasks > 1:
        total = sum(count for _, count in per_task)
        shares = ", ".join(f"{task} {count}" for task, count in per_task)
        console.rule(f"combined coreset: {total} samples ({shares})")
    for coreset, reason, count in removed:
        console.print(f"deduplication: {count} {reason} duplicates kept out of the {coreset} coreset")


def _print_task(console: Console, task, summary: dict) -> None:
    # Baseline methods store no fingerprints.
    fingerprints = f", {len(task.fingerprints)} fingerprints" if len(task.fingerprints) else ""
    console.rule(f"task {task.task}: {task.n_selected} of {task.n_scored} samples selected "
                 f"({task.n_targets} targets{fingerprints})")
    if summary["top"]:
        table = Table("rank", "sample_id", "source", "score", "tokens", "prompt", title="top of the coreset")
        for row in summary["top"]:
            table.add_row(str(row["rank"]), row["sample_id"], row["source"], f"{row['score']:.4f}",
                          str(row["n_tokens"]), preview_text(row["record"], 60))
        console.print(table)
    table = Table("", "samples", "score min / p10 / median / p90 / max", "tokens p10 / median / p90",
                  title="distribution")
    for selected, label in ((True, "coreset"), (False, "rest of pool")):
        stats = summary["distribution"].get(selected)
        if stats:
            scores = " / ".join(f"{v:.4f}" for v in stats["score"])
            lengths = " / ".join(f"{v:.0f}" for v in stats["n_tokens"][1:4])
            table.add_row(label, str(stats["count"]), scores, lengths)
    console.print(table)
    table = Table("source", "coreset", "coreset share", "pool", "pool share", title="source mix")
    n_coreset = sum(row["coreset"] for row in summary["source_mix"]) or 1
    n_pool = sum(row["pool"] for row in summary["source_mix"]) or 1
    for row in summary["source_mix"]:
        table.add_row(row["source"], str(row["coreset"]), f"{row['coreset'] / n_coreset:.1%}",
                      str(row["pool"]), f"{row['pool'] / n_pool:.1%}")
    console.print(table)
