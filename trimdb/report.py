"""Pages for people: one sample's explanation as HTML, and a task's coreset as a Markdown report.

``explanation_html`` renders a ``trimdb.explain.Explanation`` as one standalone HTML page.
``write_report`` writes PNG plots (matplotlib, Agg canvas) and ``report.md`` that links them, for
one task of one query run.
"""

from __future__ import annotations

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
            classes = ["token"] + (["out"] if background is None else []) + (["max"] if i in max_tokens else [])
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
