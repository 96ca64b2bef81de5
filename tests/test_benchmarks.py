"""The performance benchmark pipeline on a tiny model, pool and synthetic store, so it cannot rot."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from benchmarks.perf.codec_table import spearman
from benchmarks.perf.page import Results, render_page
from benchmarks.perf.run import Config, run_benchmarks
from benchmarks.perf.scale import parse_size
from benchmarks.perf.synthetic import sample_lengths
from tests.conftest import POOL, TARGETS, write_jsonl
from trimdb.codecs import CODECS

# Prompts paired with other responses: 48 distinct samples, enough tokens to train every codec.
TINY_POOL = [(prompt, response) for (prompt, _), (_, response) in itertools.product(POOL, POOL[:4])]
TINY_CODECS = list(CODECS)


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_model_dir):
    """Run every section once for the tests of this module."""
    tmp_path = tmp_path_factory.mktemp("perf")
    pool = tmp_path / "pool"
    pool.mkdir()
    write_jsonl(pool / "pool.jsonl", TINY_POOL)
    targets = {name: write_jsonl(tmp_path / f"{name}.jsonl", TARGETS) for name in ("gsm8k", "mmlu")}
    config = Config(work=tmp_path / "work", dtype="float32", model=str(tiny_model_dir), pool=pool, targets=targets,
                    source_column=None, scale_sizes=[20_000], scale_chunk=10_000, layers=2,
                    codecs=TINY_CODECS, scale_codec="sq8", query_repeats=1)
    page = tmp_path / "perf.md"
    measured = Results(command="pytest", machine=_machine(), pool={})
    run_benchmarks(config, measured, page)
    return measured, page


def _machine() -> dict:
    return {"cpu": "test", "cores": 1, "usable_cores": 1, "torch_threads": 1, "memory_bytes": 2**30, "gpu": "none",
            "load_average": None, "python": "3", "versions": {}, "date": "today"}


def test_benchmarks_every_section(results):
    measured, page = results
    text = page.read_text()
    assert measured.overhead.index_runs[0].seconds > 0
    assert len(measured.overhead.forward_seconds) == 2
    assert measured.query.speedup(measured.overhead.forward_best) > 1
    assert [row.codec for row in measured.codecs] == TINY_CODECS
    assert [point.n_vectors for point in measured.scale] == [20_000]
    assert measured.scale[0].ann is not None
    for heading in ("## 1. Index overhead", "## 2. Query", "## 3. Codecs", "## 4. Approximate", "## 5. Scale"):
        assert heading in text
    assert "Not run." not in text


def test_benchmarks_float32_codec_exact(results):
    measured, _ = results
    float32 = next(row for row in measured.codecs if row.codec == "float32")
    assert all(value == 1.0 for value in float32.overlap.values())
    assert max(float32.max_abs_score_difference.values()) < 1e-6


def test_benchmarks_scale_child_memory(results):
    measured, _ = results
    for point in measured.scale:
        assert point.query["n_scored"]["gsm8k"] > 0
        assert 0 < point.query["peak_rss_bytes"] < 8 * 2**30


@pytest.mark.parametrize("text, expected", [("200k", 200_000), ("1M", 1_000_000), ("1.5m", 1_500_000),
                                            ("20000000", 20_000_000)])
def test_parse_size_forms(text, expected):
    assert parse_size(text) == expected


def test_parse_size_invalid():
    with pytest.raises(ValueError, match="invalid size '5x'"):
        parse_size("5x")


def test_sample_lengths_sum():
    lengths = sample_lengths(np.random.default_rng(0), 10_000)
    assert lengths.sum() == 10_000
    assert lengths[:-1].min() >= 200
    assert lengths.max() <= 400


def test_spearman_reversed():
    scores = np.array([0.1, 0.5, np.nan, 0.3])
    assert spearman(scores, -scores) == pytest.approx(-1.0)


def test_page_without_sections():
    text = render_page(Results(command="pytest", machine=_machine(), pool={}))
    assert text.count("Not run.") == 5
