"""`trimdb warmup` on the tiny model, and indexes and queries that merge its LoRA adapter."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from tests.conftest import POOL, TARGETS, write_jsonl
from tests.tiny import build_tiny_llama, build_tiny_tokenizer
from trimdb.errors import ModelError, SettingsError
from trimdb.models import WARMUP_RECORD, adapter_sha256, load_model
from trimdb.store import Store
from trimdb.warmup import PRESETS, WarmupSettings, choose_samples, resolve_settings, warmup

# Small enough to train in well under a second on the tiny model; dropout 0 keeps runs comparable.
FAST = WarmupSettings(fraction=0.5, epochs=2, rank=4, alpha=8.0, dropout=0.0, learning_rate=5e-3,
                      max_length=128, batch_tokens=256)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run the tiny model on one thread, because its matrices are too small to gain from more.

    On a busy 2-core machine, two threads made the training steps 50 times slower (20 s against 0.4 s).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pool") / "pool.jsonl", POOL)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("targets") / "math.jsonl", TARGETS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, pool):
    """One warmup run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("warmup") / "adapter"
    summary = warmup([pool], out, model=str(tiny_model_dir), settings=FAST, progress=False)
    return {"out": out, "summary": summary}


@pytest.fixture(scope="module")
def adapter_index(tmp_path_factory, tiny_model_dir, pool, trained):
    """An index built through the CLI with the trained adapter."""
    db = tmp_path_factory.mktemp("index") / "pool.duckdb"
    result = invoke("index", pool, "--db", db, "--model", tiny_model_dir, "--adapter", trained["out"],
                    "--layers", 2, "--no-progress")
    assert result.exit_code == 0, result.output
    return db


def logit_change(model_dir, adapter) -> float:
    """Return the largest change that merging ``adapter`` makes to the logits of a short input."""
    base = load_model(str(model_dir))
    tuned = load_model(str(model_dir), adapter=adapter)
    input_ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        return float((base.model(input_ids).logits - tuned.model(input_ids).logits).abs().max())


def query_args(db, target):
    return ["query", "--db", db, "--task", f"math={target}", "--budget", 3, "--layers", 2, "--no-progress"]


# warmup ------------------------------------------------------------------------------------


def test_warmup_writes_adapter_files(trained):
    names = {path.name for path in trained["out"].iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", WARMUP_RECORD} <= names


def test_warmup_leaves_no_temporary_folder(trained):
    assert [p.name for p in trained["out"].parent.iterdir()] == ["adapter"]


def test_warmup_adapter_changes_model(trained, tiny_model_dir):
    assert logit_change(tiny_model_dir, trained["out"]) > 1e-4


def test_warmup_single_step_trains(tmp_path, tiny_model_dir, pool):
    # 3% of one step rounds down to no warmup step, so the only step runs at the full learning rate.
    settings = dataclasses.replace(FAST, warmup_ratio=0.03, max_steps=1)
    warmup([pool], tmp_path / "adapter", model=str(tiny_model_dir), settings=settings, progress=False)
    assert logit_change(tiny_model_dir, tmp_path / "adapter") > 1e-4


def test_warmup_record_contents(trained, tiny_model_dir):
    record = json.loads((trained["out"] / WARMUP_RECORD).read_text())
    summary = trained["summary"]
    assert record["settings"] == FAST.to_dict()
    assert record["sample_ids"] == summary.sample_ids
    assert len(record["sample_ids"]) == len(POOL) // 2
    assert record["pool"]["n_samples"] == len(POOL)
    assert record["losses"] == summary.losses
    assert record["base_model"]["weights_sha256"] == load_model(str(tiny_model_dir)).weights_sha256


def test_warmup_loss_decreases(tmp_path, tiny_model_dir):
    # Two samples in one batch, seen 10 times: every step trains on the same batch, so losses compare.
    # The random-weight model starts near log(vocabulary size) = 5.99; 10 steps lower it by about 0.25.
    pool = write_jsonl(tmp_path / "repeated.jsonl", POOL[:2])
    settings = WarmupSettings(fraction=1.0, epochs=10, rank=8, alpha=64.0, dropout=0.0, learning_rate=5e-3,
                              warmup_ratio=0.0, max_length=128, batch_tokens=1024)
    summary = warmup([pool], tmp_path / "adapter", model=str(tiny_model_dir), settings=settings, progress=False)
    assert summary.n_steps == 10
    assert summary.losses[-1] < summary.losses[0] - 0.1


def test_warmup_max_steps_stops_early(tmp_path, tiny_model_dir, pool):
    settings = WarmupSettings(fraction=1.0, epochs=5, max_length=128, batch_tokens=128, max_steps=3)
    summary = warmup([pool], tmp_path / "adapter", model=str(tiny_model_dir), settings=settings, progress=False)
    assert summary.n_steps == 3


def test_warmup_less_preset_bfloat16(tmp_path, tiny_model_dir, pool):
    # The less preset trains a bfloat16 base model; peft keeps the LoRA weights in float32.
    _, settings = resolve_settings("less", max_length=128, batch_tokens=256, max_steps=2)
    summary = warmup([pool], tmp_path / "adapter", model=str(tiny_model_dir), settings=settings, progress=False)
    assert summary.n_steps == 2
    loaded = load_model(str(tiny_model_dir), dtype="bfloat16", adapter=tmp_path / "adapter")
    assert loaded.model.dtype == torch.bfloat16


def test_warmup_rejects_nonempty_out(tmp_path, tiny_model_dir, pool):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "notes.txt").write_text("keep")
    with pytest.raises(SettingsError, match=r"output folder .*adapter already exists and is not empty"):
        warmup([pool], tmp_path / "adapter", model=str(tiny_model_dir), settings=FAST, progress=False)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_warmup_bad_fraction_rejected(tmp_path, tiny_model_dir, pool, fraction):
    settings = WarmupSettings(fraction=fraction)
    with pytest.raises(SettingsError, match=r"warmup fraction must be in \(0, 1\], got"):
        warmup([pool], tmp_path / "adapter", model=str(tiny_model_dir), settings=settings, progress=False)


def test_cli_warmup_bad_fraction_rejected(tmp_path, pool):
    result = invoke("warmup", pool, "--out", tmp_path / "adapter", "--fraction", 0)
    assert result.exit_code == 2
    assert "--fraction" in result.output


def test_cli_warmup_runs(tmp_path, tiny_model_dir, pool):
    out = tmp_path / "adapter"
    result = invoke("warmup", pool, "--out", out, "--model", tiny_model_dir, "--preset", "cpu", "--rank", 2,
                    "--max-length", 128, "--max-steps", 2, "--no-progress")
    assert result.exit_code == 0, result.output
    record = json.loads((out / WARMUP_RECORD).read_text())
    assert record["arguments"]["preset"] == "cpu"
    assert record["settings"]["rank"] == 2
    assert record["settings"]["alpha"] == PRESETS["cpu"].alpha


# sample pick -------------------------------------------------------------------------------


def test_choose_samples_same_seed_same_pick(pool):
    first, _ = choose_samples([pool], 0.5, seed=3)
    second, _ = choose_samples([pool], 0.5, seed=3)
    assert [s.sample_id for s in first] == [s.sample_id for s in second]


def test_choose_samples_other_seed_other_pick(pool):
    first, _ = choose_samples([pool], 0.5, seed=3)
    second, _ = choose_samples([pool], 0.5, seed=4)
    assert [s.sample_id for s in first] != [s.sample_id for s in second]


def test_choose_samples_ignores_file_order(tmp_path, pool):
    reversed_pool = write_jsonl(tmp_path / "reversed.jsonl", POOL[::-1])
    first, n_pool = choose_samples([pool], 0.5, seed=0)
    second, _ = choose_samples([reversed_pool], 0.5, seed=0)
    assert [s.sample_id for s in first] == [s.sample_id for s in second]
    assert n_pool == len(POOL)


def test_choose_samples_counts_distinct(tmp_path):
    doubled = write_jsonl(tmp_path / "doubled.jsonl", POOL + POOL)
    picked, n_pool = choose_samples([doubled], 0.05, seed=0)
    assert n_pool == len(POOL)
    assert len(picked) == 1  # ceil(0.05 * 12)


# presets -----------------------------------------------------------------------------------


def test_resolve_settings_override_keeps_preset():
    name, settings = resolve_settings("less", rank=4, dropout=None)
    assert name == "less"
    assert settings.rank == 4
    assert settings.dropout == PRESETS["less"].dropout
    assert settings.alpha == PRESETS["less"].alpha


def test_less_preset_matches_recipe():
    less = PRESETS["less"]
    recipe = (less.rank, less.alpha, less.dropout, less.learning_rate, less.warmup_ratio, less.epochs)
    assert recipe == (128, 512.0, 0.1, 2e-5, 0.03, 4)


@pytest.mark.parametrize("preset, overrides, message", [
    ("large", {}, r"unknown warmup preset 'large'"),
    ("cpu", {"ranks": 4}, r"unknown warmup settings ranks"),
])
def test_resolve_settings_rejects_unknown(preset, overrides, message):
    with pytest.raises(SettingsError, match=message):
        resolve_settings(preset, **overrides)


# adapters in load_model --------------------------------------------------------------------


def test_load_model_missing_adapter(tmp_path, tiny_model_dir):
    with pytest.raises(ModelError, match=r"adapter folder .*missing not found"):
        load_model(str(tiny_model_dir), adapter=tmp_path / "missing")


def test_load_model_folder_without_adapter_config(tmp_path, tiny_model_dir):
    with pytest.raises(ModelError, match=r"has no adapter_config.json, so it is not a peft adapter"):
        load_model(str(tiny_model_dir), adapter=tmp_path)


def test_load_model_adapter_other_weights(tmp_path, trained):
    from tests.tiny import save_tiny_model

    other = save_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(ModelError, match=r"was trained on model .* but the model to load is"):
        load_model(str(other), adapter=trained["out"])


def test_load_model_adapter_other_architecture(tmp_path, trained):
    # Without the warmup record only peft's own checks remain; a narrower model fails them.
    adapter = shutil.copytree(trained["out"], tmp_path / "adapter")
    (adapter / WARMUP_RECORD).unlink()
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(tokenizer, hidden=32, heads=2, kv_heads=1).save_pretrained(tmp_path / "narrow")
    tokenizer.save_pretrained(tmp_path / "narrow")
    with pytest.raises(ModelError, match=r"cannot apply adapter .* trained for another base model"):
        load_model(str(tmp_path / "narrow"), adapter=adapter)


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")
def test_load_model_adapter_other_depth(tmp_path, trained):
    adapter = shutil.copytree(trained["out"], tmp_path / "adapter")
    (adapter / WARMUP_RECORD).unlink()
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(tokenizer, layers=3).save_pretrained(tmp_path / "deeper")
    tokenizer.save_pretrained(tmp_path / "deeper")
    with pytest.raises(ModelError, match=r"has \d+ LoRA tensors but model .* takes \d+"):
        load_model(str(tmp_path / "deeper"), adapter=adapter)


# index and query with an adapter -----------------------------------------------------------


def test_index_identity_has_adapter(adapter_index, trained):
    with Store(adapter_index, read_only=True) as store:
        identity = store.catalog()["model"]
    assert identity["adapter_sha256"] == adapter_sha256(trained["out"].resolve())
    assert identity["adapter"] == str(trained["out"].resolve())


def test_query_without_adapter_rejected(adapter_index, tiny_model_dir, trained, targets):
    result = invoke(*query_args(adapter_index, targets), "--model", tiny_model_dir)
    assert result.exit_code == 1
    assert f"with adapter {trained['out'].resolve()}" in result.output
    assert "without an adapter" in result.output
    assert "adapter_sha256" in result.output


def test_query_with_adapter_works(adapter_index, tiny_model_dir, trained, targets):
    result = invoke(*query_args(adapter_index, targets), "--model", tiny_model_dir, "--adapter", trained["out"])
    assert result.exit_code == 0, result.output


def test_query_defaults_to_index_adapter(adapter_index, targets):
    result = invoke(*query_args(adapter_index, targets))
    assert result.exit_code == 0, result.output


def test_index_without_adapter_rejects_adapter_query(tmp_path, tiny_model_dir, pool, trained, targets):
    db = tmp_path / "plain.duckdb"
    result = invoke("index", pool, "--db", db, "--model", tiny_model_dir, "--layers", 2, "--no-progress")
    assert result.exit_code == 0, result.output
    result = invoke(*query_args(db, targets), "--adapter", trained["out"])
    assert result.exit_code == 1
    assert "without an adapter but this query uses" in " ".join(result.output.split())
