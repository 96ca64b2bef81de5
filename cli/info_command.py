"""`trimdb info`: print what a database contains, as tables or as JSON."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from cli.options import db_option
from trimdb.info import describe_index

# The tables show the first 12 hex digits of each hash, and --json prints the full hashes.
HASH_DIGITS = 12
MODEL_FIELDS = (
    ("name", "name"), ("path", "path"), ("architecture", "architecture"), ("layers", "num_layers"),
    ("hidden size", "hidden_size"), ("vocabulary", "vocab_size"), ("dtype", "dtype"),
    ("weights sha256", "weights_sha256"), ("tokenizer sha256", "tokenizer_sha256"),
    ("chat template sha256", "chat_template_sha256"), ("indexed by trimdb", "trimdb_version"),
)


@click.command()
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print the description as one JSON object instead of tables.")
def info(db, as_json):
    """Describe --db: model, index settings, sources, runs, tasks, skipped records and disk use.

    Opens the database read-only and loads no model. The tables shorten hashes to 12 hex
    digits, and --json prints every value in full, with each run's settings and stats.

    \b
    trimdb info --db pool.duckdb
    trimdb info --db pool.duckdb --json
    """
    description = describe_index(db)
    if as_json:
        click.echo(json.dumps(description, indent=2, ensure_ascii=False))
        return
    console = Console()
    database = description["database"]
    console.print(f"{database['path']}: schema revision {database['schema_revision']}, "
                  f"read by trimdb {database['trimdb_version']}", highlight=False, soft_wrap=True)
    if description["model"] is None:
        console.print(f"{database['path']} contains no index yet; build one with "
                      f"`trimdb index CORPUS --db {database['path']}`", highlight=False, soft_wrap=True)
        return
    for table in (_model_table(description["model"]), _settings_table(description["index_settings"]),
                  _sources_table(description), _runs_table(description["runs"]), _tasks_table(description["tasks"]),
                  _skipped_table(description["skipped"]), _disk_table(description["disk"])):
        console.print(table)


def _model_table(model: dict) -> Table:
    table = Table("field", "value", title="model")
    for label, key in MODEL_FIELDS:
        value = model.get(key)
        if key.endswith("sha256") and value:
            value = value[:HASH_DIGITS]
        table.add_row(label, "" if value is None else str(value))
    return table


def _settings_table(settings: dict) -> Table:
    table = Table("setting", "value", title="index settings")
    for key, value in _flatten(settings or {}):
        table.add_row(key, str(value))
    return table


def _flatten(values: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Return (dotted key, value) pairs of a nested dict, such as ("saliency.layers", 4)."""
    pairs = []
    for key, value in values.items():
        if isinstance(value, dict):
            pairs += _flatten(value, f"{prefix}{key}.")
        else:
            pairs.append((f"{prefix}{key}", value))
    return pairs


def _sources_table(description: dict) -> Table:
    totals = description["totals"]
    table = Table("source", "samples", "tokens", "truncated", "added by run", title="sources")
    for source in description["sources"]:
        table.add_row(source["name"], str(source["n_samples"]), str(source["n_tokens"]),
                      str(source["n_truncated"]), str(source["run_id"]))
    table.add_section()
    table.add_row("total", str(totals["n_samples"]), str(totals["n_tokens"]), str(totals["n_truncated"]), "")
    return table


def _runs_table(runs: list[dict]) -> Table:
    table = Table("run", "kind", "finished (UTC)", "duration", "trimdb", "stats", title="runs")
    for run in runs:
        duration = "" if run["seconds"] is None else f"{run['seconds']:.1f} s"
        table.add_row(str(run["run_id"]), run["kind"], (run["finished_at"] or "").replace("T", " "), duration,
                      run["trimdb_version"], _run_stats(run))
    return table


def _run_stats(run: dict) -> str:
    """Return the key counts of one run as a short line."""
    stats = run["stats"] or {}
    if run["kind"] == "index":
        line = (f"{stats.get('n_samples', 0)} samples, {stats.get('n_tokens', 0)} tokens, "
                f"{stats.get('n_skipped', 0)} skipped, {stats.get('n_duplicates', 0)} duplicates")
        if "n_already_indexed" in stats:
            line += f", {stats['n_already_indexed']} already indexed"
        return line
    if run["kind"] == "query":
        budget = (run["settings"] or {}).get("budget")
        selected = [f"{task} {values['n_selected']}" + (f" of {values['n_scored']}" if "n_scored" in values else "")
                    for task, values in stats.items() if isinstance(values, dict) and "n_selected" in values]
        return f"budget {_budget(budget)}; selected: " + ", ".join(selected)
    return ", ".join(f"{key} {value}" for key, value in stats.items() if not isinstance(value, (dict, list)))


def _budget(budget) -> str:
    """Format a stored budget such as ["fraction", 0.05] or ["count", 200]."""
    if not budget:
        return "?"
    kind, value = budget
    return f"{value * 100:g}%" if kind == "fraction" else f"{value:g}"


def _tasks_table(tasks: list[dict]) -> Table:
    table = Table("task", "run", "targets", "target tokens", "fingerprints", "scored", "selected", "target file",
                  title="tasks")
    for task in tasks:
        for index, run in enumerate(task["runs"]):
            run_label = f"{run['run_id']} (latest)" if run["run_id"] == task["latest_run_id"] else str(run["run_id"])
            table.add_row(task["task"] if index == 0 else "", run_label, str(run["n_targets"]),
                          str(run["n_target_tokens"]), str(run["n_fingerprints"]), str(run["n_scored"]),
                          str(run["n_selected"]), run["target_path"])
    return table


def _skipped_table(skipped: list[dict]) -> Table:
    table = Table("run", "records skipped", "of them duplicates", title="skipped records")
    for row in skipped:
        duplicates = "" if row["n_duplicates"] is None else str(row["n_duplicates"])
        table.add_row(str(row["run_id"]), str(row["n_skipped"]), duplicates)
    if not skipped:
        table.add_row("", "0", "")
    return table


def _disk_table(disk: dict) -> Table:
    table = Table("", "path", "size", "bytes per token", title="disk use")
    n_files = disk["n_vector_files"]
    rows = (
        ("database", disk["database_file"], disk["database_bytes"], disk["database_bytes_per_token"]),
        (f"vectors ({n_files} {'file' if n_files == 1 else 'files'})", disk["vectors_dir"], disk["vectors_bytes"],
         disk["vectors_bytes_per_token"]),
        ("total", "", disk["total_bytes"], disk["bytes_per_token"]),
    )
    for label, path, size, per_token in rows:
        table.add_row(label, path, _size(size), "" if per_token is None else f"{per_token:,.0f}")
    return table


def _size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"
