"""`trimdb sql`, `trimdb export` and `trimdb migrate`: reading and maintaining a database."""

from __future__ import annotations

import csv
import json
import sys

import click
from rich.console import Console
from rich.table import Table

from cli.options import db_option
from trimdb.ann import build_ann
from trimdb.compact import compact_index
from trimdb.merge import merge_index
from trimdb.export import EXPORT_SUFFIXES, export_coreset, run_sql
from trimdb.store import Store


@click.command()
@db_option
@click.argument("statement")
@click.option("--output", "output_format", type=click.Choice(["table", "csv", "jsonl"]), default="table",
              show_default=True, help="How to print the rows.")
def sql(db, statement, output_format):
    """Run a read-only SQL STATEMENT against --db and print the rows.

    Tables: samples, sources, tokens, runs, skipped, tasks, fingerprints, scores, selections.
    Views: sample_info (samples with source names), scored (every score with sample metadata
    and a selected flag), selected (the newest coreset of each task, in rank order).

    \b
    trimdb sql --db pool.duckdb "SELECT source, count(*) FROM selected GROUP BY source"
    trimdb sql --db pool.duckdb "SELECT * FROM skipped" --output csv
    """
    columns, rows = run_sql(db, statement)
    if output_format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    elif output_format == "jsonl":
        for row in rows:
            click.echo(json.dumps(dict(zip(columns, row)), default=str, ensure_ascii=False))
    else:
        table = Table(*columns)
        for row in rows:
            table.add_row(*("NULL" if value is None else str(value) for value in row))
        Console().print(table)


@click.command()
@db_option
@click.option("--task", required=True, help="Task whose coreset to export.")
@click.option("--run", "run_id", type=int, default=None, help="Query run to export. Default: the task's newest run.")
@click.option("--where", default=None, metavar="SQL",
              help="Extra condition over the scored view's columns, e.g. \"source <> 'sharegpt' AND n_tokens < 512\".")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help=f"Output file; its suffix ({', '.join(EXPORT_SUFFIXES)}) picks the format.")
def export(db, task, run_id, where, output):
    """Write the original records of a task's coreset, in rank order, to JSONL or Parquet.

    \b
    trimdb export --db pool.duckdb --task gsm8k -o gsm8k-coreset.jsonl
    trimdb export --db pool.duckdb --task gsm8k --where "source = 'evals'" -o evals-part.parquet
    """
    count = export_coreset(db, task, output, where=where, run_id=run_id)
    click.echo(f"wrote {count} records to {output}")


@click.command()
@db_option
def migrate(db):
    """Upgrade --db to this trimdb's schema (index and query do this on their own).

    \b
    trimdb migrate --db pool.duckdb
    """
    with Store(db):
        pass
    click.echo(f"{db} is at the current schema")


@click.command()
@db_option
@click.option("--target-mb", type=click.FloatRange(min=0, min_open=True), default=1024, show_default=True,
              help="Largest merged segment, in megabytes of stored vectors.")
def compact(db, target_mb):
    """Merge small adjacent vector segments of --db into larger ones.

    Codes are merged as stored, so scores do not change; queries open fewer files.

    \b
    trimdb compact --db pool.duckdb --target-mb 2048
    """
    summary = compact_index(db, target_mb)
    click.echo(f"{summary.segments_before} segments ({summary.bytes_before / 1e6:.1f} MB) -> "
               f"{summary.segments_after} segments ({summary.bytes_after / 1e6:.1f} MB)")


@click.command()
@db_option
@click.option("--lists", type=click.IntRange(min=0), default=None,
              help="IVF lists of the summary index. Default: about 4 x sqrt(samples); exact search under 10,000 "
                   "samples.")
def ann(db, lists):
    """Build the sample-summary index that `trimdb query --approximate` searches.

    One vector per sample (the normalized mean of its stored token vectors) in a FAISS IVF index.
    Rebuild it after indexing more data; approximate queries reject a stale one.

    \b
    trimdb ann --db pool.duckdb
    trimdb query --db pool.duckdb --task gsm8k=gsm8k.jsonl --budget 5% --approximate
    """
    summary = build_ann(db, lists)
    click.echo(f"indexed {summary.n_samples} sample summaries ({summary.n_lists or 'exact search, no'} IVF lists, "
               f"{summary.bytes / 1e6:.1f} MB) in {summary.seconds:.1f} s")


@click.command()
@db_option
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def merge(db, sources):
    """Copy the samples of SOURCES (indexes built elsewhere) into --db.

    Every source must come from the same model and index settings. Samples --db already contains
    are skipped; token vectors keep their stored codes. --db is created when missing.

    \b
    trimdb merge --db pool.duckdb shard-1.duckdb shard-2.duckdb
    """
    for source in sources:
        summary = merge_index(db, source)
        click.echo(f"{source}: merged {summary.n_samples} samples ({summary.n_tokens} tokens) in "
                   f"{summary.n_segments} segments; {summary.n_already_present} were already in {db}")
