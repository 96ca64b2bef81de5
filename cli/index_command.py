"""`trimdb index`: one forward pass per corpus sample, stored in the database."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from cli.options import adapter_option, db_option, format_option, index_options, model_option, progress_option
from trimdb.indexing import DEFAULT_SEGMENT_MB, index_corpus
from trimdb.records import ON_ERROR
from trimdb.settings import IndexSettings, SaliencySettings

SKIPPED_SHOWN = 10


@click.command()
@click.argument("corpus", nargs=-1, required=True, type=click.Path(exists=True))
@db_option
@model_option
@adapter_option
@format_option
@index_options
@click.option("--source", default=None, help="Source name for every sample. Default: the file name without extension.")
@click.option("--source-column", default=None, help="Record field that contains each sample's source name.")
@click.option("--on-error", type=click.Choice(ON_ERROR), default="stop", show_default=True,
              help="On a bad record: stop before writing anything, or skip it and list it in the skipped table.")
@click.option("--append", is_flag=True,
              help="Add CORPUS to an existing index (fails if --db does not exist); samples already indexed are skipped.")
@click.option("--segment-mb", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_SEGMENT_MB,
              show_default=True,
              help="Float32 vector megabytes per segment: the work a crash can lose, and the vectors held in memory.")
@progress_option
def index(corpus, db, model, adapter, record_format, dtype, max_length, batch_tokens, no_saliency, plain_template, codec,
          layers, row_saliency, source, source_column, on_error, append, segment_mb, progress):
    """Index CORPUS files (JSONL, JSON, Parquet, or folders of them) into --db.

    Each sample is rendered with the model's chat template; the final hidden state of every
    prompt and response token goes into a FAISS segment keyed by the token's row in DuckDB.
    Segments are committed as they finish: rerunning the same command after a crash resumes,
    and rerunning with new files (or --append) adds them; samples already indexed are skipped.

    \b
    trimdb index alpaca.jsonl sharegpt.json --db pool.duckdb
    trimdb index data/ --db pool.duckdb --dtype bfloat16 --on-error skip
    """
    settings = IndexSettings(
        max_length=max_length, dtype=dtype, store_saliency=not no_saliency, batch_tokens=batch_tokens,
        plain_template=plain_template, codec=codec,
        saliency=SaliencySettings(layers=layers, row_saliency=row_saliency),
    )
    arguments = {"corpus": list(corpus), "model": model, "adapter": adapter, "format": record_format, "source": source,
                 "source_column": source_column, "on_error": on_error}
    summary = index_corpus(db, list(corpus), model=model, settings=settings, format=record_format, source=source,
                           source_column=source_column, on_error=on_error, progress=progress, arguments=arguments,
                           append=append, segment_mb=segment_mb, adapter=adapter)
    _print_summary(summary, db)


def _print_summary(summary, db) -> None:
    console = Console()
    console.print(
        f"indexed {summary.n_samples} samples ({summary.n_truncated} truncated): {summary.n_tokens} content tokens "
        f"stored, {summary.n_forward_tokens} tokens through the model in {summary.seconds:.1f} s "
        f"({summary.tokens_per_second:.0f} tokens/s); run {summary.run_id}; "
        f"{db} and its vectors take {summary.bytes_on_disk / 1e6:.1f} MB"
    )
    if summary.n_already_indexed:
        console.print(f"{summary.n_already_indexed} samples were already in the index and were skipped")
    if not summary.skipped:
        return
    console.print(f"skipped {len(summary.skipped)} records ({summary.n_duplicates} duplicates):")
    table = Table("file", "line", "field", "reason")
    for record in summary.skipped[:SKIPPED_SHOWN]:
        table.add_row(str(record.path), str(record.line or ""), record.field or "", record.reason)
    console.print(table)
    if len(summary.skipped) > SKIPPED_SHOWN:
        console.print(f"all of them: trimdb sql --db {db} \"SELECT * FROM skipped WHERE run_id = {summary.run_id}\"")
