"""`trimdb explain` and `trimdb report`: why one sample got its score, and plots of a task's coreset."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli.options import db_option
from trimdb.explain import (DEFAULT_TOP, SALIENCY_COLORS, SCORE_COLORS, Explanation, explain_sample, scale_color,
                            text_color, token_blocks, visible_text)

TOP_FINGERPRINTS = 20


def task_option(function):
    return click.option("--task", required=True, help="Target task name, as given to `trimdb query --task`.")(function)


def run_option(function):
    return click.option("--run", "run_id", type=int, default=None,
                        help="Query run id. Default: the task's newest run.")(function)


@click.command()
@db_option
@task_option
@click.argument("sample_id")
@run_option
@click.option("--top", type=click.IntRange(min=1), default=DEFAULT_TOP, show_default=True,
              help="Number of highest-scoring tokens to list.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the explanation to this file as a standalone HTML page.")
def explain(db, task, sample_id, run_id, top, html_path):
    """Show why SAMPLE_ID got its score for --task, token by token.

    Token scores are recomputed from the stored vectors and fingerprints under the run's
    settings, so they match the scores table. The output colours every token by its score,
    names the tokens that decide the max and lists the top tokens with the fingerprint each
    one matched (or, for a class the target lacks, the nearest one).

    \b
    trimdb explain --db pool.duckdb --task gsm8k 3b763f962d7e8012
    trimdb explain --db pool.duckdb --task gsm8k 3b763f962d7e8012 --run 2 --html why.html
    """
    explanation = explain_sample(db, task, sample_id, run_id, top=top)
    console = Console()
    _print_explanation(console, explanation)
    if html_path:
        from trimdb.report import explanation_html  # trimdb.report imports matplotlib, which is slow to import

        Path(html_path).parent.mkdir(parents=True, exist_ok=True)
        Path(html_path).write_text(explanation_html(explanation), encoding="utf-8")
        console.print(f"wrote {html_path}", markup=False, highlight=False)


@click.command()
@db_option
@task_option
@run_option
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for report.md and its PNG plots; created when missing, and earlier files are overwritten.")
@click.option("--fingerprints", "top_fingerprints", type=click.IntRange(min=1), default=TOP_FINGERPRINTS,
              show_default=True, help="Number of fingerprints, by highest saliency sum, listed in the report.")
def report(db, task, run_id, out_dir, top_fingerprints):
    """Write PNG plots and a Markdown page about a task's coreset into a folder.

    The page covers the score histogram of pool and coreset, score against length, the source
    mix, the share of tokens on the unseen-class path and the most salient fingerprints.

    \b
    trimdb report --db pool.duckdb --task gsm8k -o gsm8k-report
    trimdb report --db pool.duckdb --task gsm8k --run 2 -o gsm8k-run2
    """
    from trimdb.report import PLOT_FILES, write_report  # imported here because matplotlib is slow to import

    path = write_report(db, task, out_dir, run_id, top_fingerprints=top_fingerprints)
    click.echo(f"wrote {path} and {len(PLOT_FILES)} plots")


def _print_explanation(console: Console, e: Explanation) -> None:
    console.rule(Text(f"sample {e.sample_id}: task {e.task}, run {e.run_id}"))
    if e.stored is None:
        console.print(f"source {e.source}; run {e.run_id} did not score this sample "
                      "(no in-scope token, or indexed after the run)", markup=False, highlight=False)
    else:
        verdict = "selected" if e.selected else "not selected"
        console.print(f"source {e.source}; rank {e.stored.rank} of {e.n_scored}; {verdict} "
                      f"(the coreset has {e.n_selected})", markup=False, highlight=False)
    console.print(_summary_table(e))
    console.print(f"score {e.formula()}; scope {e.settings.scope}, unseen-class penalty "
                  f"{e.settings.unseen_penalty:g}", markup=False, highlight=False)
    low, high = e.score_range()
    console.print(_legend("tokens by score (the max in reverse video)", low, high, SCORE_COLORS))
    console.print(_token_text(e, lambda t: None if t.score is None else scale_color(t.score, low, high)))
    if e.has_saliency:
        console.print(_legend("tokens by stored saliency", 0.0, 1.0, SALIENCY_COLORS))
        console.print(_token_text(e, lambda t: None if t.saliency is None
                                  else scale_color(t.saliency, 0, 1, SALIENCY_COLORS)))
    console.print(_token_table(e, e.max_tokens, "tokens that decide the max"))
    console.print(_token_table(e, e.top_tokens, f"top {len(e.top_tokens)} tokens by score (mean {e.mean:.6f})"))


def _summary_table(e: Explanation) -> Table:
    table = Table("", "recomputed", "stored", title="sample score")
    stored = e.stored
    for name, value, saved in (("score", e.score, stored and stored.score), ("mean", e.mean, stored and stored.mean_part),
                               ("max", e.max, stored and stored.max_part),
                               ("unseen share", e.unseen_share, stored and stored.unseen_share)):
        table.add_row(name, f"{value:.6f}", "" if stored is None else f"{saved:.6f}")
    return table


def _legend(title: str, low: float, high: float, stops: tuple[str, ...]) -> Text:
    text = Text(f"\n{title}: {low:.4f} ")
    for i in range(9):
        text.append("  ", style=f"on {scale_color(i / 8, 0, 1, stops)}")
    text.append(f" {high:.4f}")
    return text


def _token_text(e: Explanation, color_of) -> Text:
    """Return the sample's tokens as rich Text; labels name each block's part."""
    text = Text()
    max_tokens = set(e.max_tokens)
    for label, indices in token_blocks(e):
        text.append(f"\n[{label}]\n", style="bold")
        for i in indices:
            background = color_of(e.tokens[i])
            style = "dim" if background is None else f"{text_color(background)} on {background}"
            if i in max_tokens:
                style += " reverse"
            text.append(visible_text(e.tokens[i].text), style=style)
    return text


def _token_table(e: Explanation, indices: list[int], title: str) -> Table:
    table = Table("position", "token", "part", "score", "path", "fingerprint", "cosine", "saliency", title=title)
    for i in indices:
        t = e.tokens[i]
        path = f"unseen × {e.settings.unseen_penalty:g}" if t.unseen else "matched"
        # Text cells print token text as is; a plain string would be parsed as rich markup.
        table.add_row(str(t.position), Text(repr(t.text)), t.part, f"{t.score:.4f}", path,
                      Text(f"{t.fingerprint_text!r} ({t.fingerprint_class})"), f"{t.similarity:.4f}",
                      "" if t.saliency is None else f"{t.saliency:.3f}")
    return table
