"""Shared fixtures: a tiny random-weight Llama saved as a local model folder, and small corpora."""

from __future__ import annotations

import json
import logging

import pytest

from tests.tiny import save_tiny_model

POOL = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Add 17 and 25.", "17 + 25 = 42, so the answer is 42."),
    ("Solve for x: 2x + 3 = 11.", "Subtract 3 to get 2x = 8, so x = 4."),
    ("Write a short poem about the sea.", "The sea is wide and blue, the waves are calm."),
    ("Why is the sky blue?", "Sunlight scatters in the air, and blue light scatters more than red light."),
    ("How do I sort a list in Python?", "Use sorted(items) or items.sort()."),
    ("Give me a list of five fruits.", "apple, banana, cherry, grape and orange"),
    ("Multiply 6 by 7.", "6 * 7 = 42."),
    ("Explain how a computer stores numbers.", "Numbers are stored as bits, and eight bits make one byte."),
    ("Translate hello into Spanish.", "hola"),
    ("Divide 100 by 4.", "100 / 4 = 25."),
    ("Summarize the article in one sentence.", "A small town lives by the river that runs through the valley."),
]
TARGETS = [
    ("Add 6 and 7.", "6 + 7 = 13, so the answer is 13."),
    ("Solve for x: x + 5 = 9.", "Subtract 5 to get x = 4."),
    ("Multiply 3 by 4.", "3 * 4 = 12."),
]


def write_jsonl(path, pairs, style: str = "messages"):
    """Write (prompt, response) pairs as JSONL in one of the supported record formats."""
    with open(path, "w") as handle:
        for prompt, response in pairs:
            if style == "alpaca":
                record = {"instruction": prompt, "input": "", "output": response}
            else:
                record = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
            handle.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture
def pool_file(tmp_path):
    return write_jsonl(tmp_path / "pool.jsonl", POOL)


@pytest.fixture
def target_file(tmp_path):
    return write_jsonl(tmp_path / "math.jsonl", TARGETS)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="trimdb")
