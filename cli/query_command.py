"""`trimdb query`: score the indexed pool for target tasks and store the coresets."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from cli.options import db_option, format_option, model_option, progress_option, score_options
from trimdb.query import preview_text, query_tasks, summarize_task
from trimdb.settings import SaliencySettings, ScoreSettings
from trimdb.store import Store


def parse_task(ctx, param, values) -> dict[str, str]:
    tasks: dict[str, str] = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator or not name or not path:
            raise click.BadParameter(f"{value!r} is not NAME=FILE, for example gsm8k=targets/gsm8k.jsonl", param=param)
        if name in tasks:
            raise click.BadParameter(f"task {name!r} is given twice", param=param)
        tasks[name] = path
    return tasks


@click.command()
@db_option
@click.option("--task", "tasks", multiple=True, required=True, callback=parse_task, metavar="NAME=FILE",
              help="Target task: a name and a file of 5 to 10 target samples. Repeat for several tasks.")
@click.option("--budget", required=True, metavar="PERCENT%|COUNT",
              help="Coreset size per task: a share of the pool such as 5% or a sample count such as 500.")
@model_option
@format_option
@score_options
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="Number of top samples to print per task.")
@progress_option
def query(db, tasks, budget, model, record_format, scope, unseen_penalty, row_weight, column_weight,
          mean_weight, max_weight, layers, row_saliency, top, progress):
    """Score every indexed sample for each --task and store the ranked coreset.

    Only the target samples go through the model; the pool is scored from the vectors that
    `trimdb index` stored. Results go to the scores, selections and fingerprints tables.

    \b
    trimdb query --db pool.duckdb --task gsm8k=gsm8k.jsonl --budget 5%
    trimdb query --db pool.duckdb --task mmlu=mmlu.jsonl --budget 200 --scope response
    """
    settings = ScoreSettings(
        saliency=SaliencySettings(layers=layers, row_saliency=row_saliency, row_weight=row_weight,
                                  column_weight=column_weight),
        scope=scope, unseen_penalty=unseen_penalty, mean_weight=mean_weight, max_weight=max_weight,
    )
    arguments = {"tasks": tasks, "budget": budget, "model": model, "format": record_format}
    result = query_tasks(db, tasks, budget, settings=settings, model=model, format=record_format,
                         progress=progress, arguments=arguments)
    console = Console()
    with Store(db, read_only=True) as store:
        for task in result.tasks:
            _print_task(console, task, summarize_task(store, result.run_id, task.task, top))
    console.print(f"run {result.run_id} took {result.seconds:.1f} s. Explore it with SQL, for example:")
    first = result.tasks[0].task
    console.print(f"  trimdb sql --db {db} \"SELECT rank, source, score, n_tokens FROM selected WHERE task = '{first}' LIMIT 20\"",
                  highlight=False, soft_wrap=True)
    console.print(f"  trimdb export --db {db} --task {first} -o {first}-coreset.jsonl", highlight=False, soft_wrap=True)


def _print_task(console: Console, task, summary: dict) -> None:
    console.rule(f"task {task.task}: {task.n_selected} of {task.n_scored} samples selected "
                 f"({task.n_targets} targets, {len(task.fingerprints)} fingerprints)")
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
