"""Pages for people: one sample's explanation as HTML, and a task's coreset as a Markdown report.

``explanation_html`` renders a ``trimdb.explain.Explanation`` as one standalone HTML page.
``write_report`` writes PNG plots (matplotlib, Agg canvas) and ``report.md`` that links them, for
one task of one query run.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trimdb.errors import StorageError
from trimdb.explain import (SALIENCY_COLORS, SCORE_COLORS, Explanation, describe_token, run_settings, scale_color,
                            text_color, token_blocks, visible_text)
from trimdb.export import resolve_run
from trimdb.settings import ScoreSettings
from trimdb.store import Store

log = logging.getLogger(__name__)

# HTML page of an explanation -----------------------------------------------------------------

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
.tokens { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9;
          border: 1px solid #ccc; padding: 0.8em; }
.tokens .out { color: #888; }
.tokens .max { outline: 2px solid #000; }
.label { display: block; font: 600 0.75em system-ui, sans-serif; color: #555; margin-top: 0.6em; }
.legend span { display: inline-block; width: 1.5em; height: 1em; vertical-align: middle; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
code { white-space: pre; }
"""


def explanation_html(explanation: Explanation) -> str:
    """Render an explanation as one standalone HTML page (inline CSS, no scripts or external assets)."""
    e = explanation
    title = f"trimdb explain: sample {e.sample_id}, task {e.task}, run {e.run_id}"
    parts = [f"<h1>{html.escape(title)}</h1>", _html_summary(e)]
    low, high = e.score_range()
    parts.append("<h2>Tokens coloured by score</h2>")
    parts.append(_html_legend(low, high, SCORE_COLORS, "token score"))
    parts.append(_html_tokens(e, lambda t: None if t.score is None else scale_color(t.score, low, high)))
    if e.has_saliency:
        parts.append("<h2>Tokens coloured by saliency</h2>")
        parts.append("<p>Saliency as the index stored it, min-max normalized over the sample's content tokens.</p>")
        parts.append(_html_legend(0.0, 1.0, SALIENCY_COLORS, "saliency"))
        parts.append(_html_tokens(e, lambda t: None if t.saliency is None else scale_color(t.saliency, 0, 1, SALIENCY_COLORS)))
    parts.append("<h2>Tokens that decide the max</h2>")
    parts.append(_html_token_table(e, e.max_tokens))
    parts.append(f"<h2>Top {len(e.top_tokens)} tokens by score</h2>")
    parts.append(f"<p>The mean over all {sum(t.score is not None for t in e.tokens)} in-scope tokens is {e.mean:.6f}.</p>")
    parts.append(_html_token_table(e, e.top_tokens))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{PAGE_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _html_summary(e: Explanation) -> str:
    if e.stored is None:
        place = f"Run {e.run_id} did not score this sample (no in-scope token, or indexed after the run)."
    else:
        verdict = "selected" if e.selected else "not selected"
        place = f"Rank {e.stored.rank} of {e.n_scored} scored samples: {verdict} (the coreset has {e.n_selected})."
    settings = e.settings
    lines = [
        f"<p>Source {html.escape(e.source)}. {place}</p>",
        f"<p>Score: <code>{html.escape(e.formula())}</code>. Scope {html.escape(settings.scope)}, "
        f"unseen-class penalty {settings.unseen_penalty:g}.</p>",
        "<table><tr><th></th><th>recomputed</th><th>stored</th></tr>",
    ]
    stored = e.stored
    for name, value, saved in (("score", e.score, stored and stored.score), ("mean", e.mean, stored and stored.mean_part),
                               ("max", e.max, stored and stored.max_part),
                               ("unseen share", e.unseen_share, stored and stored.unseen_share)):
        saved_text = "" if stored is None else f"{saved:.6f}"
        lines.append(f'<tr><td>{name}</td><td class="number">{value:.6f}</td><td class="number">{saved_text}</td></tr>')
    lines.append("</table>")
    return "\n".join(lines)


def _html_legend(low: float, high: float, stops: tuple[str, ...], name: str) -> str:
    swatches = "".join(f'<span style="background:{scale_color(i / 8, 0, 1, stops)}"></span>' for i in range(9))
    return f'<p class="legend">{name} {low:.4f} {swatches} {high:.4f}</p>'


def _html_tokens(e: Explanation, color_of) -> str:
    max_tokens = set(e.max_tokens)
    pieces = ['<div class="tokens">']
    for label, indices in token_blocks(e):
        pieces.append(f'<span class="label">{html.escape(label)}</span>')
        for i in indices:
            token = e.tokens[i]
            background = color_of(token)
            classes = ["token"]
            if background is None:
                classes.append("out")
            if i in max_tokens:
                classes.append("max")
            style = "" if background is None else f' style="background:{background};color:{text_color(background)}"'
            pieces.append(f'<span class="{" ".join(classes)}"{style} title="{html.escape(describe_token(token))}">'
                          f"{html.escape(visible_text(token.text))}</span>")
    pieces.append("</div>")
    return "".join(pieces)


def _html_token_table(e: Explanation, indices: list[int]) -> str:
    if not indices:
        return "<p>No token is in scope.</p>"
    header = ("<tr><th>position</th><th>token</th><th>part</th><th>score</th><th>path</th>"
              "<th>fingerprint</th><th>cosine</th><th>saliency</th></tr>")
    rows = [f"<table>{header}"]
    for i in indices:
        t = e.tokens[i]
        path = f"unseen × {e.settings.unseen_penalty:g}" if t.unseen else "matched"
        saliency = "" if t.saliency is None else f"{t.saliency:.3f}"
        rows.append(
            f'<tr><td class="number">{t.position}</td><td><code>{html.escape(repr(t.text))}</code></td><td>{t.part}</td>'
            f'<td class="number">{t.score:.4f}</td><td>{path}</td>'
            f"<td><code>{html.escape(repr(t.fingerprint_text))}</code> ({t.fingerprint_class})</td>"
            f'<td class="number">{t.similarity:.4f}</td><td class="number">{saliency}</td></tr>'
        )
    rows.append("</table>")
    return "\n".join(rows)


# Markdown report of a coreset ----------------------------------------------------------------

# Fingerprints listed in the report: the head of the saliency ranking contains a task's tell-tale tokens.
TOP_FINGERPRINTS = 20
HISTOGRAM_BINS = 40
UNSEEN_BINS = np.linspace(0.0, 1.0, 21)
# Grey for the pool, ColorBrewer Dark2 orange for the coreset: distinct in colour and in lightness.
POOL_COLOR, CORESET_COLOR = "#9e9e9e", "#d95f02"
FIGURE_SIZE = (7.0, 4.0)
DPI = 120
# Length spread (max / min n_tokens) from which the length axis is logarithmic.
LOG_LENGTH_SPREAD = 20
PLOT_FILES = ("score_histogram.png", "score_vs_length.png", "source_mix.png", "unseen_share.png")
ANISOTROPY_NOTE = (
    "Raw last-layer cosines sit in a narrow band because a causal LM's hidden states share a common "
    "direction (anisotropy), so scores differ by small amounts, but the coreset depends only on their "
    "order and the ranking still separates the samples."
)


@dataclass
class ReportData:
    """The data of one task's report in one query run: every scored sample and the top fingerprints."""

    task: str
    run_id: int
    started_at: dt.datetime
    settings: ScoreSettings
    budget: list | None
    task_row: dict
    n_unscored: int | None
    score: np.ndarray
    n_tokens: np.ndarray
    unseen_share: np.ndarray
    source: np.ndarray
    selected: np.ndarray
    fingerprints: list[tuple]
    # "trim", or the baseline that scored the run (query --method).
    method: str = "trim"


def write_report(
    db_path: str | Path, task: str, out_dir: str | Path, run_id: int | None = None, *,
    top_fingerprints: int = TOP_FINGERPRINTS,
) -> Path:
    """Write the plots and ``report.md`` of a task's coreset into ``out_dir``; return the report's path."""
    with Store(db_path, read_only=True) as store:
        data = _load_report_data(store, task, run_id, top_fingerprints)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = (_plot_scores(data), _plot_score_vs_length(data), _plot_source_mix(data), _plot_unseen_share(data))
    for name, figure in zip(PLOT_FILES, figures):
        figure.savefig(out_dir / name, dpi=DPI)
    path = out_dir / "report.md"
    path.write_text(_markdown(data), encoding="utf-8")
    log.debug("task %s, run %d: wrote %s and %d plots", task, data.run_id, path, len(PLOT_FILES))
    return path


def _load_report_data(store: Store, task: str, run_id: int | None, top_fingerprints: int) -> ReportData:
    run_id = resolve_run(store, task, run_id)
    columns = store.query("SELECT score, n_tokens, unseen_share, source, selected FROM scored "
                          "WHERE run_id = ? AND task = ? ORDER BY rank", [run_id, task]).fetchnumpy()
    if len(columns["score"]) == 0:
        raise StorageError(f"{store.path}: run {run_id} scored no sample for task {task!r}, so there is nothing to report")
    cursor = store.query("SELECT * FROM tasks WHERE run_id = ? AND task = ?", [run_id, task])
    task_row = dict(zip([c[0] for c in cursor.description], cursor.fetchone()))
    started_at, settings_json, stats_json = store.query(
        "SELECT started_at, settings, stats FROM runs WHERE run_id = ?", [run_id]).fetchone()
    stats = json.loads(stats_json or "{}").get(task, {})
    fingerprints = store.query(
        "SELECT token_class, token_text, n_occurrences, saliency_sum FROM fingerprints WHERE run_id = ? AND task = ? "
        "ORDER BY saliency_sum DESC, token_class LIMIT ?", [run_id, task, top_fingerprints]).fetchall()
    return ReportData(
        task, run_id, started_at, run_settings(store, run_id), json.loads(settings_json).get("budget"), task_row,
        stats.get("n_unscored"), np.asarray(columns["score"], np.float64), np.asarray(columns["n_tokens"], np.int64),
        np.asarray(columns["unseen_share"], np.float64), np.asarray(columns["source"], object),
        np.asarray(columns["selected"], bool), fingerprints, json.loads(settings_json).get("method") or "trim",
    )


# Plots ---------------------------------------------------------------------------------------


def _new_axes(title: str):
    figure = Figure(figsize=FIGURE_SIZE, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.set_axisbelow(True)
    return figure, axes


def _plot_scores(data: ReportData) -> Figure:
    figure, axes = _new_axes(f"Sample scores, task {data.task} (run {data.run_id})")
    bins = np.histogram_bin_edges(data.score, HISTOGRAM_BINS)
    axes.hist(data.score, bins, color=POOL_COLOR, label=f"pool ({len(data.score)})")
    axes.hist(data.score[data.selected], bins, color=CORESET_COLOR, label=f"coreset ({data.selected.sum()})")
    if data.selected.any():
        axes.axvline(data.score[data.selected].min(), color="#000000", linestyle="--", linewidth=1,
                     label="lowest coreset score")
    axes.set_xlabel("sample score")
    axes.set_ylabel("samples")
    axes.legend()
    return figure


def _plot_score_vs_length(data: ReportData) -> Figure:
    figure, axes = _new_axes(f"Score against length, task {data.task} (run {data.run_id})")
    rest = ~data.selected
    axes.scatter(data.n_tokens[rest], data.score[rest], s=8, alpha=0.5, color=POOL_COLOR, label="rest of pool")
    axes.scatter(data.n_tokens[data.selected], data.score[data.selected], s=18, color=CORESET_COLOR,
                 edgecolors="#000000", linewidths=0.4, label="coreset")
    if data.n_tokens.max() >= LOG_LENGTH_SPREAD * max(data.n_tokens.min(), 1):
        axes.set_xscale("log")
    axes.set_xlabel("content tokens per sample (n_tokens)")
    axes.set_ylabel("sample score")
    axes.legend()
    return figure


def _plot_source_mix(data: ReportData) -> Figure:
    rows = _source_mix(data)
    figure, axes = _new_axes(f"Source mix, task {data.task} (run {data.run_id})")
    positions = np.arange(len(rows))
    height = 0.4
    axes.barh(positions - height / 2, [r[4] for r in rows], height, color=POOL_COLOR, label="pool")
    axes.barh(positions + height / 2, [r[2] for r in rows], height, color=CORESET_COLOR, label="coreset")
    axes.set_yticks(positions, [r[0] for r in rows])
    axes.invert_yaxis()
    axes.xaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    axes.set_xlabel("share of samples")
    axes.legend()
    return figure


def _plot_unseen_share(data: ReportData) -> Figure:
    figure, axes = _new_axes(f"Share of tokens on the unseen-class path, task {data.task}")
    for mask, color, label in ((np.ones_like(data.selected), POOL_COLOR, "pool"),
                               (data.selected, CORESET_COLOR, "coreset")):
        values = data.unseen_share[mask]
        axes.hist(values, UNSEEN_BINS, weights=np.full(len(values), 1 / max(len(values), 1)), color=color,
                  alpha=0.6, label=f"{label} ({len(values)})")
    axes.xaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    axes.yaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    axes.set_xlabel("unseen share (tokens whose class has no fingerprint)")
    axes.set_ylabel("share of samples")
    axes.legend()
    return figure


def _source_mix(data: ReportData) -> list[tuple[str, int, float, int, float]]:
    """Return (source, coreset count, coreset share, pool count, pool share), largest pool first."""
    names, pool = np.unique(data.source, return_counts=True)
    n_pool, n_coreset = len(data.source), max(int(data.selected.sum()), 1)
    rows = []
    for name, count in zip(names, pool):
        in_coreset = int((data.selected & (data.source == name)).sum())
        rows.append((str(name), in_coreset, in_coreset / n_coreset, int(count), count / n_pool))
    return sorted(rows, key=lambda row: (-row[3], row[0]))


# Markdown ------------------------------------------------------------------------------------


def _markdown(data: ReportData) -> str:
    if data.method != "trim":
        sections = [_md_baseline_overview(data), _md_scores(data), _md_sources(data)]
    else:
        sections = [_md_overview(data), _md_scores(data), _md_sources(data), _md_unseen(data), _md_fingerprints(data)]
    return "\n\n".join(sections) + "\n"


def _md_baseline_overview(data: ReportData) -> str:
    row = data.task_row
    return "\n".join([
        f"# trimdb report: task {_md_code(data.task)}, run {data.run_id}",
        "",
        f"Query run {data.run_id} (started {data.started_at:%Y-%m-%d %H:%M} UTC) ran the {_md_code(data.method)} "
        f"baseline against {row['n_targets']} target samples ({_md_code(row['target_path'])}), scored "
        f"{row['n_scored']} pool samples and selected {row['n_selected']} (budget {_budget_text(data.budget)}).",
        "",
        "A baseline scores whole samples, so this report has no fingerprints and no unseen share, and its "
        "scores are on the baseline's own scale. The unseen-share plot (unseen_share.png) does not apply to it.",
    ])


def _md_overview(data: ReportData) -> str:
    row, settings = data.task_row, data.settings
    unscored = f" ({data.n_unscored} samples had no in-scope token and no score)" if data.n_unscored else ""
    return "\n".join([
        f"# trimdb report: task {_md_code(data.task)}, run {data.run_id}",
        "",
        f"Query run {data.run_id} (started {data.started_at:%Y-%m-%d %H:%M} UTC) built {row['n_fingerprints']} "
        f"fingerprints from {row['n_targets']} target samples ({row['n_target_tokens']} in-scope tokens, "
        f"{_md_code(row['target_path'])}), scored {row['n_scored']} pool samples{unscored} and selected "
        f"{row['n_selected']} (budget {_budget_text(data.budget)}).",
        "",
        f"Settings: scope {settings.scope}, unseen-class penalty {settings.unseen_penalty:g}, "
        f"sample score = {settings.mean_weight:g} × mean + {settings.max_weight:g} × max of the token scores, "
        f"saliency over the last {settings.saliency.layers} layers ({settings.saliency.row_saliency} row form).",
        "",
        ANISOTROPY_NOTE,
    ])


def _md_scores(data: ReportData) -> str:
    lines = ["## Scores", "", "| samples | count | min | median | max |", "|---|---:|---:|---:|---:|"]
    for label, mask in (("pool", np.ones_like(data.selected)), ("coreset", data.selected),
                        ("rest of pool", ~data.selected)):
        values = data.score[mask]
        band = " | ".join(f"{v:.4f}" for v in np.quantile(values, [0, 0.5, 1])) if len(values) else "– | – | –"
        lines.append(f"| {label} | {len(values)} | {band} |")
    lines += ["", "![Histogram of sample scores, pool against coreset](score_histogram.png)", "",
              "### Score against length", "",
              "![Sample score against content tokens per sample, coreset highlighted](score_vs_length.png)"]
    return "\n".join(lines)


def _md_sources(data: ReportData) -> str:
    lines = ["## Source mix", "", "![Share of each source in the pool and in the coreset](source_mix.png)", "",
             "| source | coreset | coreset share | pool | pool share |", "|---|---:|---:|---:|---:|"]
    for name, coreset, coreset_share, pool, pool_share in _source_mix(data):
        lines.append(f"| {_md_cell(name)} | {coreset} | {coreset_share:.1%} | {pool} | {pool_share:.1%} |")
    return "\n".join(lines)


def _md_unseen(data: ReportData) -> str:
    pool, coreset = data.unseen_share, data.unseen_share[data.selected]
    medians = f"median {np.median(pool):.1%} in the pool"
    if len(coreset):
        medians += f" and {np.median(coreset):.1%} in the coreset"
    return "\n".join([
        "## Unseen share", "",
        f"Share of a sample's in-scope tokens whose class has no fingerprint, scored at "
        f"{data.settings.unseen_penalty:g} × the nearest fingerprint: {medians}.", "",
        "![Distribution of the unseen share, pool against coreset](unseen_share.png)",
    ])


def _md_fingerprints(data: ReportData) -> str:
    lines = [f"## Fingerprints with the highest saliency sum (top {len(data.fingerprints)})", "",
             "Token text as the fingerprints table stores it, in the tokenizer's own spelling.", "",
             "| token class | token text | occurrences | saliency sum |", "|---:|---|---:|---:|"]
    for token_class, token_text, occurrences, saliency_sum in data.fingerprints:
        lines.append(f"| {token_class} | {_md_code(token_text or '', in_table=True)} | {occurrences} | {saliency_sum:.3f} |")
    return "\n".join(lines)


def _budget_text(budget) -> str:
    if not budget:
        return "not stored"
    kind, value = budget
    return f"{value * 100:g}%" if kind == "fraction" else f"{int(value)} samples"


def _md_cell(text: str) -> str:
    """Escape text for a Markdown table cell: pipes would split the cell, line breaks the row."""
    return html.escape(str(text)).replace("|", "\\|").replace("\n", " ")


def _md_code(text: str, in_table: bool = False) -> str:
    """Return ``text`` as a Markdown code span, fenced by more backticks than it contains.

    In a table cell a pipe must be escaped even inside a code span (GitHub Flavored Markdown).
    """
    text = str(text).replace("\n", "↵")
    if in_table:
        text = text.replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{padding}{text}{padding}{fence}"
