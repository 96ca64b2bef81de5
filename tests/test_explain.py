"""`trimdb explain` and `trimdb report` on a tiny indexed pool, checked against the stored scores."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.conftest import POOL, TARGETS, write_jsonl
from tests.tiny import build_tiny_tokenizer
from trimdb.errors import SettingsError
from trimdb.explain import SCORE_COLORS, explain_sample, scale_color, token_texts
from trimdb.report import PLOT_FILES, _md_code, explanation_html, write_report
from trimdb.store import Store

SCRIPT_PROMPT = "<script>alert('x')</script> Add 2 and 2."
# Token scores are float32 dot products. The query scan and the explanation multiply the same
# vectors in another matrix layout, so they differ by float32 rounding only, far below 1e-6.
TOLERANCE = 1e-6
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def invoke_ok(*args):
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def build_db(folder, model, *extra_index_args):
    """Index POOL plus a sample with a <script> tag, then query task "math" at 25% (run 2)."""
    pool = write_jsonl(folder / "pool.jsonl", POOL + [(SCRIPT_PROMPT, "2 + 2 = 4.")])
    target = write_jsonl(folder / "math.jsonl", TARGETS)
    db = folder / "pool.duckdb"
    invoke_ok("index", pool, "--db", db, "--model", model, "--layers", 2, "--no-progress", *extra_index_args)
    invoke_ok("query", "--db", db, "--task", f"math={target}", "--budget", "25%", "--layers", 2, "--no-progress")
    return db


@pytest.fixture(scope="module")
def db(tmp_path_factory, tiny_model_dir):
    return build_db(tmp_path_factory.mktemp("explain"), tiny_model_dir)


def stored_scores(db) -> list[tuple]:
    with Store(db, read_only=True) as store:
        return store.query("SELECT sample_id, score, mean_part, max_part, unseen_share, rank, selected "
                           "FROM scored WHERE run_id = 2 AND task = 'math' ORDER BY rank").fetchall()


def script_sample_id(db) -> str:
    with Store(db, read_only=True) as store:
        return store.query("SELECT sample_id FROM samples WHERE record LIKE '%<script>%'").fetchone()[0]


# explain: numbers ----------------------------------------------------------------------------


def test_explain_matches_stored_scores(db):
    for sample_id, score, mean_part, max_part, unseen_share, rank, selected in stored_scores(db):
        explanation = explain_sample(db, "math", sample_id)
        assert explanation.score == pytest.approx(score, abs=TOLERANCE), sample_id
        assert explanation.mean == pytest.approx(mean_part, abs=TOLERANCE), sample_id
        assert explanation.max == pytest.approx(max_part, abs=TOLERANCE), sample_id
        assert explanation.unseen_share == pytest.approx(unseen_share, abs=TOLERANCE), sample_id
        assert explanation.stored.rank == rank
        assert explanation.selected == selected


def test_explain_token_paths(db):
    explanation = explain_sample(db, "math", script_sample_id(db))
    scored = [t for t in explanation.tokens if t.score is not None]
    assert any(t.unseen for t in scored)
    assert not all(t.unseen for t in scored)
    for token in scored:
        if token.unseen:
            assert token.score == pytest.approx(explanation.settings.unseen_penalty * token.similarity)
        else:
            assert token.fingerprint_class == token.token_class
            assert token.score == pytest.approx(token.similarity)


def test_explain_max_and_top_tokens(db):
    explanation = explain_sample(db, "math", stored_scores(db)[-1][0], top=3)
    top_scores = [explanation.tokens[i].score for i in explanation.top_tokens]
    assert len(top_scores) == 3
    assert top_scores == sorted(top_scores, reverse=True)
    assert top_scores[0] == explanation.max
    assert all(explanation.tokens[i].score == explanation.max for i in explanation.max_tokens)


def test_explain_token_text_matches_record(db):
    explanation = explain_sample(db, "math", script_sample_id(db))
    text = "".join(token.text for token in explanation.tokens)
    assert SCRIPT_PROMPT in text
    assert "2 + 2 = 4." in text


def test_explain_stored_saliency(db):
    explanation = explain_sample(db, "math", stored_scores(db)[0][0])
    assert explanation.has_saliency
    assert all(0 <= token.saliency <= 1 for token in explanation.tokens)


# explain: errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("task, sample_id, run_id, message", [
    ("math", "0123456789abcdef", None, r"sample '0123456789abcdef' not found in .*; the top samples of task 'math' "
                                       r"in run 2 are [0-9a-f]{16}, .* List every sample id with: trimdb sql"),
    ("poetry", "0123456789abcdef", None, r"task 'poetry' not found in .*; tasks: math"),
    ("math", "0123456789abcdef", 7, r"run 7 has no task 'math'; its runs are 2"),
])
def test_explain_unknown_value_message(db, task, sample_id, run_id, message):
    with pytest.raises(SettingsError, match=message):
        explain_sample(db, task, sample_id, run_id)


def test_explain_rejects_baseline_run(tmp_path, tiny_model_dir):
    db = build_db(tmp_path, tiny_model_dir)
    invoke_ok("query", "--db", db, "--task", f"math={tmp_path / 'math.jsonl'}", "--budget", "25%", "--method", "bm25")
    sample_id = stored_scores(db)[0][0]
    with pytest.raises(SettingsError, match="run 3 used --method bm25, which scores whole samples"):
        explain_sample(db, "math", sample_id, 3)
    report = write_report(db, "math", tmp_path / "report", run_id=3).read_text()
    assert "ran the `bm25` baseline" in report
    assert "fingerprints" not in report.split("\n\n", 3)[1]
    assert "## Fingerprints" not in report


def test_explain_cli_unknown_sample_exit_code(db):
    result = CliRunner().invoke(cli, ["explain", "--db", str(db), "--task", "math", "nope"])
    assert result.exit_code == 1
    assert "sample 'nope' not found" in result.output


# explain: rendering --------------------------------------------------------------------------


def test_explain_cli_prints_tables(db):
    sample_id = stored_scores(db)[0][0]
    result = invoke_ok("explain", "--db", db, "--task", "math", sample_id, "--run", 2, "--top", 4)
    assert f"sample {sample_id}: task math, run 2" in result.output
    assert "tokens that decide the max" in result.output
    assert "top 4 tokens by score" in result.output


def test_explain_html_escapes_sample_text(db, tmp_path):
    page_path = tmp_path / "why.html"
    invoke_ok("explain", "--db", db, "--task", "math", script_sample_id(db), "--html", page_path)
    page = page_path.read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    # The tag is split over several token spans; with the markup removed, the escaped text remains.
    visible = html.unescape(re.sub(r"<[^>]+>", "", page)).replace("↵", "")
    assert SCRIPT_PROMPT in visible


def test_explain_html_self_contained(db):
    page = explanation_html(explain_sample(db, "math", stored_scores(db)[0][0]))
    assert page.startswith("<!DOCTYPE html>")
    assert re.search(r"https?://|<link|<img|src=|url\(", page) is None
    assert "Tokens coloured by saliency" in page
    assert len(re.findall(r'class="token[ "]', page)) == len(explain_sample(db, "math", stored_scores(db)[0][0]).tokens) * 2


def test_explain_html_without_saliency(tmp_path, tiny_model_dir):
    db = build_db(tmp_path, tiny_model_dir, "--no-saliency")
    explanation = explain_sample(db, "math", stored_scores(db)[0][0])
    assert not explanation.has_saliency
    assert "Tokens coloured by saliency" not in explanation_html(explanation)


# explain: helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["Paris is in France.", "café, naïve, 東京 and 🙂", "line one\nline two"])
def test_token_texts_join_to_text(text):
    tokenizer = build_tiny_tokenizer()
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False))
    assert "".join(token_texts(tokenizer, ids, np.arange(len(ids)))) == text


@pytest.mark.parametrize("value, expected", [(0.0, SCORE_COLORS[0]), (1.0, SCORE_COLORS[-1]), (-5.0, SCORE_COLORS[0]),
                                             (0.5, SCORE_COLORS[4]), (9.0, SCORE_COLORS[-1])])
def test_scale_color_stops(value, expected):
    assert scale_color(value, 0.0, 1.0) == expected


# report --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(db, tmp_path_factory):
    """The report of task "math" (run 2) with the top 3 fingerprints: (path of report.md, its text)."""
    path = write_report(db, "math", tmp_path_factory.mktemp("report") / "out", top_fingerprints=3)
    return path, path.read_text(encoding="utf-8")


def test_report_writes_plots(report):
    path, _ = report
    assert path.name == "report.md"
    for name in PLOT_FILES:
        assert (path.parent / name).read_bytes().startswith(PNG_SIGNATURE), name


def test_report_links_plots(report):
    _, text = report
    for name in PLOT_FILES:
        assert f"]({name})" in text, name


def test_report_counts_and_band(db, report):
    _, text = report
    scores = [row[1] for row in stored_scores(db)]
    n_selected = sum(row[6] for row in stored_scores(db))
    assert f"scored {len(POOL) + 1} pool samples and selected {n_selected} (budget 25%)" in text
    assert f"| pool | {len(scores)} | {min(scores):.4f} | {np.median(scores):.4f} | {max(scores):.4f} |" in text
    assert "anisotropy" in text


def test_report_fingerprint_table(db, report):
    _, text = report
    with Store(db, read_only=True) as store:
        top = store.query("SELECT token_class, n_occurrences FROM fingerprints WHERE run_id = 2 "
                          "ORDER BY saliency_sum DESC, token_class LIMIT 3").fetchall()
    rows = re.findall(r"^\| (\d+) \| `.*` \| (\d+) \| [\d.]+ \|$", text, flags=re.MULTILINE)
    assert [(int(c), int(n)) for c, n in rows] == top


def test_report_cli_writes_folder(db, tmp_path):
    result = invoke_ok("report", "--db", db, "--task", "math", "--run", 2, "-o", tmp_path / "out")
    assert f"wrote {tmp_path / 'out' / 'report.md'} and {len(PLOT_FILES)} plots" in result.output


def test_report_unknown_task_message(db, tmp_path):
    with pytest.raises(SettingsError, match=r"task 'poetry' not found in .*; tasks: math"):
        write_report(db, "poetry", tmp_path)


@pytest.mark.parametrize("text, expected", [("Ġthe", "`Ġthe`"), ("a`b", "``a`b``"), ("`", "`` ` ``"),
                                            ("a|b", "`a|b`")])
def test_md_code_fences(text, expected):
    assert _md_code(text) == expected
