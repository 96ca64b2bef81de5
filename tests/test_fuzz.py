"""Corpora that mix valid records with broken ones, hand-made and from seeded random mutations.

Reading and rendering either yield a record or list it as skipped with its file, line and reason,
and no exception but trimdb's own escapes. `trimdb index --on-error skip` stores the valid records
and lists every other one in the ``skipped`` table. Stop mode names the first bad record and
leaves the database as it was.

Length rule at ``--max-length 64``, as trimdb.render implements it: a longer sample loses prompt
tokens from the start of its earliest prompt first, then response tokens from the end of its last
response, and is stored with ``truncated`` set. Template tokens always stay, so a sample whose
template tokens alone reach 64 is skipped ("needs N template tokens plus at least 1 response
token"). Below that, at least one response token always survives the cut, so truncation never
removes a whole response. A response made only of special tokens has no response tokens at any
length and is skipped ("no response tokens").

The tiny model renders with SmolLM2's chat template. It injects a default system prompt of 53
tokens into a conversation without a system turn, so such a sample keeps 11 content tokens at
most. A conversation with a short system turn has 23 template tokens per exchange.
"""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_cli import copy_db, index_args, invoke, invoke_ok, rows, scalar, snapshot
from tests.tiny import build_tiny_tokenizer
from trimdb.errors import RenderError, TrimdbError
from trimdb.records import SkippedRecord, read_corpus, to_messages
from trimdb.render import PROMPT, RESPONSE, SENTINEL_PREFIX, TEMPLATE, Renderer

MAX_LENGTH = 64
SYSTEM = {"role": "system", "content": "Be brief."}
HUGE_BYTES = 4_000_000
SEED = 20240501
MUTATED_PER_FILE = 40
JSONL_FILES = 8  # 8 files x 40 mutated records = 320 mutations
WORD = "solve "


def conversation(*pairs: tuple[str, str], system: bool = True, **extra) -> dict:
    """Return a messages record with an optional system turn and extra top-level fields."""
    messages = [SYSTEM] if system else []
    for prompt, response in pairs:
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return {"messages": messages, **extra}


def dumps(record) -> bytes:
    return json.dumps(record).encode("utf-8")


class Case(NamedTuple):
    """One corpus line and what `trimdb index --on-error skip` does with it."""

    line: bytes
    indexed: bool
    field: str | None = None
    reason: str = ""
    truncated: bool = False


def indexed(record, truncated: bool = False) -> Case:
    return Case(record if isinstance(record, bytes) else dumps(record), True, truncated=truncated)


def skipped(record, field: str | None, reason: str) -> Case:
    return Case(record if isinstance(record, bytes) else dumps(record), False, field, reason)


ADD = conversation(("Add 2 and 2.", "4."))
HUGE = dumps(conversation(("Name a color.", "blue"), meta="x" * HUGE_BYTES))
NUMBER_CONTENT = conversation(("Hi", "ok"))
NUMBER_CONTENT["messages"][2]["content"] = 42
ROBOT = conversation(("Hi", "ok"))
ROBOT["messages"][1]["role"] = "robot"

# Line by line, the JSONL part of the fuzz corpus. Line numbers are positions in this list + 1.
JSONL_CASES = [
    indexed(ADD),
    skipped(dumps(ADD)[:-9], None, "invalid JSON: "),
    skipped(NUMBER_CONTENT, "messages[2].content", "expected string, got number"),
    skipped(ADD["messages"], None, "not a JSON object (got array)"),
    skipped({"messages": None}, "messages", "expected array, got null"),
    skipped({"messages": [SYSTEM, {"role": "user"}, {"role": "assistant", "content": "ok"}]},
            "messages[1].content", "missing field"),
    skipped(conversation(("", "ok")), "messages[1].content", "empty user content"),
    skipped({"messages": []}, "messages", "no user turn"),
    skipped(b'{"messages": "\xff\xfe"}', None, "invalid UTF-8 at byte 14"),
    indexed(HUGE),
    skipped(HUGE[:-100], None, "invalid JSON: Unterminated string"),
    skipped(ADD, None, "duplicate of sample"),
    skipped(conversation(("Add 2 and 2.", "4."), id="copy-of-line-1"), None, "duplicate of sample"),
    skipped(ROBOT, "messages[1].role", "unknown role 'robot'"),
    indexed(conversation((WORD * 300, "Done.")), truncated=True),
    indexed(conversation(("Count.", WORD * 300)), truncated=True),
    skipped(conversation(*[("Hi", "ok")] * 4), None,
            "template tokens plus at least 1 response token, but max_length is 64"),
    skipped(conversation(("Hi", "<|im_end|>")), None, "no response tokens"),
    skipped(b"[" * 5000 + b"]" * 5000, None, "invalid JSON: arrays or objects nested too deeply"),
    indexed(conversation(("Nest.", "ok"), meta=json.loads("[" * 200 + "]" * 200))),
    skipped(conversation(("Hi", f"{SENTINEL_PREFIX}0>>")), None, "reserved marker"),
    Case(b"   ", False),  # a blank line is no record: neither indexed nor skipped
    indexed(conversation(("Name a fruit.", "apple"), system=False)),
    indexed(conversation(("Multiply 6 by 7.", "6 * 7 = 42."), system=False), truncated=True),
    skipped(conversation(("Hi there.", "ok"), meta="\ud800"), "meta", "invalid Unicode: lone surrogate"),
    skipped(conversation(("Hi there.", "ok"), tags={"\udc00": 1}), "tags.\\udc00", "invalid Unicode: lone surrogate"),
]
JSON_CASES = [
    indexed({"instruction": "Say hi.", "output": "hi", "system": "Be brief."}),
    skipped(7, None, "not a JSON object (got number)"),
    skipped({"instruction": "Say hi.", "output": 7}, "output", "expected string, got number"),
    skipped({"instruction": "Say hi."}, "output", "missing field"),
    skipped({"instruction": "Say hi.", "output": " \n"}, "output", "empty assistant content"),
    skipped({"instruction": "Say hi.", "input": ["x"], "output": "hi"}, "input", "expected string, got array"),
    indexed({"instruction": "Say bye.", "output": "bye", "system": "Be brief."}),
]
PARQUET_CASES = [  # (prompt, completion) rows of a prompt_completion file
    (("Name a tree.", "oak"), Case(b"", True)),
    ((None, "oak"), Case(b"", False, "prompt", "missing field")),
    (("Name a tree.", ""), Case(b"", False, "completion", "empty assistant content")),
    (("Name a tree.", "<|endoftext|>"), Case(b"", False, None, "no response tokens")),
    (("Name a bird.", "owl"), Case(b"", True)),
]


def write_fuzz_corpus(folder: Path) -> dict[tuple[str, int], Case]:
    """Write the JSONL, JSON and Parquet fuzz files; return each record's case by (path, line)."""
    folder.mkdir(parents=True, exist_ok=True)
    jsonl, json_file, parquet = folder / "mixed.jsonl", folder / "mixed.json", folder / "mixed.parquet"
    jsonl.write_bytes(b"\n".join(case.line for case in JSONL_CASES) + b"\n")
    json_file.write_text("[" + ",\n".join(case.line.decode() for case in JSON_CASES) + "]")
    pairs = [pair for pair, _ in PARQUET_CASES]
    table = pa.table({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})
    pq.write_table(table, parquet)
    cases = {(str(jsonl), line): case for line, case in enumerate(JSONL_CASES, start=1) if case.line.strip()}
    cases |= {(str(json_file), line): case for line, case in enumerate(JSON_CASES, start=1)}
    cases |= {(str(parquet), line): case for line, (_, case) in enumerate(PARQUET_CASES, start=1)}
    return cases


def fuzz_index_args(db, model, *corpus):
    return [*index_args(db, model, *corpus), "--max-length", MAX_LENGTH]


@pytest.fixture(scope="module")
def fuzz_db(tmp_path_factory, tiny_model_dir):
    """The fuzz corpus indexed in skip mode, with its expected cases."""
    folder = tmp_path_factory.mktemp("fuzz")
    cases = write_fuzz_corpus(folder / "corpus")
    db = folder / "fuzz.duckdb"
    result = invoke_ok(*fuzz_index_args(db, tiny_model_dir, folder / "corpus"), "--on-error", "skip")
    return {"db": db, "cases": cases, "output": result.output}


# Skip mode over the fuzz corpus ----------------------------------------------------------------


def test_index_skip_lists_bad_records(fuzz_db):
    listed = {(path, line): (field, reason)
              for path, line, field, reason in rows(fuzz_db["db"], "SELECT path, line, field, reason FROM skipped")}
    expected = {key: case for key, case in fuzz_db["cases"].items() if not case.indexed}
    assert sorted(listed) == sorted(expected)
    for key, case in expected.items():
        field, reason = listed[key]
        assert field == case.field, key
        assert case.reason in reason, key


def test_index_skip_stores_valid_records(fuzz_db):
    stored = rows(fuzz_db["db"], "SELECT path, line FROM samples")
    expected = [key for key, case in fuzz_db["cases"].items() if case.indexed]
    assert sorted(stored) == sorted(expected)


def test_index_skip_counts_in_run_stats(fuzz_db):
    stats = json.loads(scalar(fuzz_db["db"], "SELECT stats FROM runs WHERE kind = 'index'"))
    cases = fuzz_db["cases"].values()
    n_duplicates = sum("duplicate" in case.reason for case in cases)
    assert stats["n_samples"] == sum(case.indexed for case in cases)
    assert stats["n_duplicates"] == n_duplicates == 2
    assert stats["n_skipped"] == sum(not case.indexed for case in cases) - n_duplicates


def test_index_skip_flags_truncation(fuzz_db):
    flags = {(path, line): truncated
             for path, line, truncated in rows(fuzz_db["db"], "SELECT path, line, truncated FROM samples")}
    assert flags == {key: case.truncated for key, case in fuzz_db["cases"].items() if case.indexed}


def truncated_lengths(line: bytes) -> tuple[int, int]:
    """Return the (prompt, response) token counts that the length rule leaves of a JSONL line's sample."""
    untruncated = Renderer(build_tiny_tokenizer(), max_length=100_000)
    parts = untruncated.render(to_messages(json.loads(line), "messages", path="-", line=1)).parts
    n_template, n_prompt, n_response = (parts.count(part) for part in (TEMPLATE, PROMPT, RESPONSE))
    excess = n_template + n_prompt + n_response - MAX_LENGTH
    prompt_cut = min(n_prompt, excess)
    return n_prompt - prompt_cut, n_response - (excess - prompt_cut)


def test_index_truncation_cuts_prompt_first(fuzz_db):
    stored = dict(((path, line), (n_prompt, n_response)) for path, line, n_prompt, n_response in rows(
        fuzz_db["db"], "SELECT path, line, n_prompt_tokens, n_response_tokens FROM samples WHERE truncated"))
    expected = {key: truncated_lengths(case.line) for key, case in fuzz_db["cases"].items() if case.truncated}
    assert stored == expected


def test_index_truncation_keeps_response(fuzz_db):
    no_prompt = rows(fuzz_db["db"], "SELECT line, n_response_tokens FROM samples WHERE truncated AND n_prompt_tokens = 0")
    assert no_prompt, "no truncated sample lost its whole prompt"
    for line, n_response in no_prompt:
        assert n_response > 0, line


def test_index_huge_record_stored_whole(fuzz_db):
    sql = "SELECT length(record->>'meta') FROM samples WHERE path LIKE '%.jsonl' AND line = 10"
    assert scalar(fuzz_db["db"], sql) == HUGE_BYTES


def test_index_skip_prints_table(fuzz_db):
    n_listed = sum(not case.indexed for case in fuzz_db["cases"].values())
    assert f"skipped {n_listed} records (2 duplicates)" in fuzz_db["output"]


# Stop mode --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [2, 3, 5, 9, 14, 17, 19], ids=lambda line: f"line{line}")
def test_index_stop_names_record(tmp_path, tiny_model_dir, bad):
    case = JSONL_CASES[bad - 1]
    corpus = tmp_path / "bad.jsonl"
    corpus.write_bytes(JSONL_CASES[0].line + b"\n" + case.line + b"\n")
    db = tmp_path / "new.duckdb"
    result = invoke(*fuzz_index_args(db, tiny_model_dir, corpus))
    location = f"{corpus}:2: " + (f"field '{case.field}': " if case.field else "")
    assert result.exit_code == 1, result.output
    assert f"Error: {location}" in result.output
    assert case.reason in result.output
    assert not db.exists()


@pytest.fixture(scope="module")
def valid_db(tmp_path_factory, tiny_model_dir):
    """A database indexed at --max-length 64 from the valid JSONL fuzz records."""
    folder = tmp_path_factory.mktemp("valid")
    corpus = folder / "valid.jsonl"
    corpus.write_bytes(b"\n".join(case.line for case in JSONL_CASES if case.indexed and len(case.line) < 1000))
    db = folder / "valid.duckdb"
    invoke_ok(*fuzz_index_args(db, tiny_model_dir, corpus))
    return db


def test_index_stop_keeps_database(valid_db, tiny_model_dir, tmp_path):
    db = copy_db(valid_db, tmp_path / "copy")
    before = snapshot(db)
    write_fuzz_corpus(tmp_path / "corpus")
    result = invoke(*fuzz_index_args(db, tiny_model_dir, tmp_path / "corpus"))
    assert result.exit_code == 1, result.output
    assert f"{tmp_path / 'corpus' / 'mixed.json'}:2: not a JSON object (got number)" in result.output
    assert snapshot(db) == before


# Seeded random mutations ------------------------------------------------------------------------

BASE_RECORDS = {
    "messages": [
        conversation(("Add 2 and 2.", "4.")),
        conversation(("Name a fruit.", "apple"), system=False, id=3),
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                      {"role": "assistant", "content": "Hello"}]},
    ],
    "sharegpt": [
        {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Why?"},
                           {"from": "gpt", "value": "Because."}, {"from": "human", "value": "Ok."},
                           {"from": "gpt", "value": "Yes."}]},
    ],
    "alpaca": [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Translate.", "input": "hello", "output": "hola", "system": "Be brief."},
    ],
    "prompt_completion": [
        {"prompt": "Say hi.", "completion": "hi"},
        {"prompt": "Say bye.", "response": "bye", "tags": ["a", "b"]},
    ],
}
# Replacement values for the type and string mutations.
VALUES = [None, 0, -1.5, True, [], {}, ["x"], {"role": "user"}, [{"type": "text", "text": "x"}], 10**30]
STRINGS = ["", " \n\t", "\ud800", "\x00", "<|im_end|>", "<|im_start|>user", f"{SENTINEL_PREFIX}0>>",
           "robot", "HUMAN", "system", "assistant", "日本語のテキスト", WORD * 80, "{{ messages }}", "\\"]


def _locations(value, found: list) -> list:
    """Collect (container, key) for every value nested in ``value``."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        items = []
    for key, item in items:
        found.append((value, key))
        _locations(item, found)
    return found


def _mutate_structure(rng: random.Random, record) -> None:
    """Apply one structural mutation in place: delete a key or item, or replace a value."""
    locations = _locations(record, [])
    if not locations:
        return
    container, key = rng.choice(locations)
    operation = rng.choice(["delete", "retype", "string"])
    if operation == "delete":
        del container[key]
    elif operation == "retype":
        container[key] = copy.deepcopy(rng.choice(VALUES))
    else:
        container[key] = rng.choice(STRINGS)


def _mutate_bytes(rng: random.Random, line: bytes) -> bytes:
    """Insert random bytes into the line or truncate it."""
    if rng.random() < 0.5:
        position = rng.randrange(len(line) + 1)
        return line[:position] + rng.randbytes(rng.randint(1, 8)) + line[position:]
    return line[:rng.randrange(len(line))]


def mutated_line(rng: random.Random, record: dict) -> bytes:
    """Return one to three mutations of ``record`` as JSONL, sometimes the same line twice."""
    record = copy.deepcopy(record)
    for _ in range(rng.randint(1, 3)):
        _mutate_structure(rng, record)
    line = dumps(record)  # ASCII JSON, so a lone surrogate becomes a \ud800 escape
    if rng.random() < 0.3:
        line = _mutate_bytes(rng, line)
    if rng.random() < 0.05:
        line = line + b"\n" + line
    return line


def record_lines(data: bytes) -> list[int]:
    """Return the numbers of the JSONL lines that contain a record, which are all lines that are not blank.

    A line that is not valid UTF-8 counts as a record, because trimdb reports it as invalid.
    """
    numbers = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            numbers.append(number)
            continue
        if text.strip():
            numbers.append(number)
    return numbers


def read_and_render(path: Path, renderer: Renderer, **options) -> tuple[list[int], list[SkippedRecord]]:
    """Read a file in skip mode and render each sample as `trimdb index` does. Return kept lines and skips."""
    skipped_records: list[SkippedRecord] = []
    kept = []
    for sample in read_corpus([path], on_error="skip", skipped=skipped_records, **options):
        try:
            rendered = renderer.render(sample.messages)
        except RenderError as error:
            skipped_records.append(SkippedRecord(sample.path, sample.line, None, str(error)))
            continue
        assert len(rendered.input_ids) <= MAX_LENGTH
        json.dumps(sample.record, ensure_ascii=False).encode("utf-8")  # as `trimdb index` stores it
        kept.append(sample.line)
    return kept, skipped_records


def reason_kind(reason: str) -> str:
    """Return the check that a skip reason names, without its values (quoted text and numbers)."""
    return re.sub(r"'[^']*'|\d+", "_", reason.split(":")[0].split(" (")[0])


@pytest.fixture(scope="module")
def renderer():
    return Renderer(build_tiny_tokenizer(), max_length=MAX_LENGTH)


def mutated_files(folder: Path, forced: bool) -> list[tuple[Path, str]]:
    """Write the seeded mutation files. Line 1 stays valid unless ``forced``, which mutates it too."""
    rng = random.Random(SEED + forced)
    files = []
    for number in range(JSONL_FILES):
        record_format = list(BASE_RECORDS)[number % len(BASE_RECORDS)]
        bases = BASE_RECORDS[record_format]
        lines = [] if forced else [dumps(bases[0])]
        lines += [mutated_line(rng, rng.choice(bases)) for _ in range(MUTATED_PER_FILE)]
        path = folder / f"mutated-{number}.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        files.append((path, record_format))
    return files


@pytest.mark.parametrize("forced", [False, True], ids=["detected", "forced"])
def test_mutations_yield_or_skip(tmp_path, renderer, forced):
    reasons = set()
    for path, record_format in mutated_files(tmp_path, forced):
        options = {"format": record_format} if forced else {}
        try:
            kept, skipped_list = read_and_render(path, renderer, **options)
        except TrimdbError as error:
            pytest.fail(f"{path} raised in skip mode: {error}")
        lines = record_lines(path.read_bytes())
        assert sorted(kept + [record.line for record in skipped_list]) == lines, path
        for record in skipped_list:
            assert record.path == str(path)
            assert isinstance(record.line, int)
            assert record.reason
            reasons.add(reason_kind(record.reason))
    # The mutations reach many different checks, not one failure mode over and over.
    assert len(reasons) >= 12, sorted(reasons)


def test_mutations_keep_valid_records(tmp_path, renderer):
    kept_total = 0
    for path, _ in mutated_files(tmp_path, forced=False):
        kept, _ = read_and_render(path, renderer)
        assert 1 in kept, path
        kept_total += len(kept)
    assert kept_total > JSONL_FILES


def test_mutations_json_array(tmp_path, renderer):
    rng = random.Random(SEED)
    for record_format, bases in BASE_RECORDS.items():
        records = [bases[0]]
        for _ in range(MUTATED_PER_FILE):
            record = copy.deepcopy(rng.choice(bases))
            _mutate_structure(rng, record)
            records.append(record)
        path = tmp_path / f"{record_format}.json"
        path.write_text(json.dumps(records))
        kept, skipped_list = read_and_render(path, renderer)
        assert sorted(kept + [record.line for record in skipped_list]) == list(range(1, len(records) + 1))


def test_mutations_parquet(tmp_path, renderer):
    rng = random.Random(SEED)
    choices = ["Say hi.", "hi", None, "", " ", "<|im_end|>", f"{SENTINEL_PREFIX}1>>", WORD * 80]
    n_rows = 60
    table = pa.table({"prompt": [rng.choice(choices) for _ in range(n_rows)],
                      "completion": [rng.choice(choices) for _ in range(n_rows)]})
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path, row_group_size=7)
    kept, skipped_list = read_and_render(path, renderer, format="prompt_completion")
    assert sorted(kept + [record.line for record in skipped_list]) == list(range(1, n_rows + 1))
    assert kept
    assert skipped_list
