"""Tests for trimdb.records: file types, record formats, validation and skip mode."""

from __future__ import annotations

import datetime
import gzip
import json
import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trimdb.errors import InputError, SettingsError
from trimdb.records import (
    Message,
    Sample,
    SkippedRecord,
    detect_format,
    read_corpus,
    read_samples,
    to_messages,
)

ALPACA = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
MESSAGES = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
PROMPT_COMPLETION = {"prompt": "Hi", "completion": "Hello"}
MESSAGES_2 = {"messages": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "Hey"}]}
HI_HELLO = (Message("user", "Hi"), Message("assistant", "Hello"))


def write_jsonl(path, records):
    """Write records as JSONL lines, writing a bytes item as the raw line."""
    with open(path, "wb") as handle:
        for record in records:
            line = record if isinstance(record, bytes) else json.dumps(record).encode("utf-8")
            handle.write(line + b"\n")
    return path


def read_all(path, **options):
    return list(read_samples(path, **options))


# --- Formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize("record, expected", [
    (ALPACA, "alpaca"),
    (SHAREGPT, "sharegpt"),
    (MESSAGES, "messages"),
    (PROMPT_COMPLETION, "prompt_completion"),
    ({"prompt": "Hi", "response": "Hello"}, "prompt_completion"),
    ({**MESSAGES, "prompt": "Hi", "prompt_id": "x"}, "messages"),
    ({"instruction": "Hi"}, None),
    ({"prompt": "Hi", "chosen": "Hello"}, None),
    ({}, None),
])
def test_detect_format_cases(record, expected):
    assert detect_format(record) == expected


@pytest.mark.parametrize("record, expected", [
    (ALPACA, (Message("user", "Add 2 and 3."), Message("assistant", "5"))),
    ({"instruction": "Sum these.", "input": "2 3", "output": "5"},
     (Message("user", "Sum these.\n\n2 3"), Message("assistant", "5"))),
    ({"instruction": "Sum.", "input": None, "output": "5", "system": "Be brief."},
     (Message("system", "Be brief."), Message("user", "Sum."), Message("assistant", "5"))),
    ({"instruction": "Sum.", "output": "5", "system": ""},
     (Message("user", "Sum."), Message("assistant", "5"))),
    (SHAREGPT, HI_HELLO),
    ({"conversations": [{"from": "system", "value": "S"}, {"from": "user", "value": "Hi"},
                        {"from": "chatgpt", "value": "Hello"}]},
     (Message("system", "S"), *HI_HELLO)),
    ({"conversations": [{"from": "Human", "value": "Hi"}, {"from": "bard", "value": "Hello"}]}, HI_HELLO),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "model", "value": "Hello"}]}, HI_HELLO),
    ({"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
     HI_HELLO),
    (MESSAGES, HI_HELLO),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "H"},
                                                 {"type": "text", "text": "i"}]},
                   {"role": "assistant", "content": "Hello"}]}, HI_HELLO),
    (PROMPT_COMPLETION, HI_HELLO),
    ({"prompt": "Hi", "response": "Hello"}, HI_HELLO),
])
def test_read_samples_formats(tmp_path, record, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [record])
    [sample] = read_all(path)
    assert sample.messages == expected
    assert sample.record == record
    assert sample.path == str(path)
    assert sample.line == 1
    assert sample.source == "data"


def test_read_samples_format_override(tmp_path):
    record = {**MESSAGES, "prompt": "Other", "completion": "Answer"}
    path = write_jsonl(tmp_path / "data.jsonl", [record])
    [sample] = read_all(path, format="prompt_completion")
    assert sample.messages == (Message("user", "Other"), Message("assistant", "Answer"))


def test_read_samples_override_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [MESSAGES])
    with pytest.raises(InputError, match=r"data\.jsonl:1: field 'instruction': missing field"):
        read_all(path, format="alpaca")


def test_read_samples_multi_turn_whole(tmp_path):
    turns = [{"role": "system", "content": "S"}]
    for index in range(3):
        turns += [{"role": "user", "content": f"q{index}"}, {"role": "assistant", "content": f"a{index}"}]
    turns.append({"role": "user", "content": "follow-up without a reply"})
    path = write_jsonl(tmp_path / "data.jsonl", [{"messages": turns}])
    [sample] = read_all(path)
    assert [(m.role, m.content) for m in sample.messages] == [(t["role"], t["content"]) for t in turns]


def test_read_samples_consecutive_roles_kept(tmp_path):
    turns = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
             {"role": "assistant", "content": "c"}, {"role": "assistant", "content": "d"}]
    path = write_jsonl(tmp_path / "data.jsonl", [{"messages": turns}])
    [sample] = read_all(path)
    assert len(sample.messages) == 4


def test_to_messages_unknown_format():
    with pytest.raises(SettingsError, match=r"unknown format 'chatml': expected one of alpaca"):
        to_messages(MESSAGES, "chatml", path="x.jsonl", line=1)


def test_message_invalid_role():
    with pytest.raises(ValueError, match=r"invalid role 'tool'"):
        Message("tool", "x")


# --- Sample ids ---------------------------------------------------------------------------------


def test_sample_id_stable_across_files(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", [MESSAGES])
    second = write_jsonl(tmp_path / "second.jsonl", [ALPACA, SHAREGPT])
    [sample_a] = read_all(first)
    sample_b = read_all(second, format="sharegpt", on_error="skip")[0]
    assert sample_a.source != sample_b.source
    assert sample_a.line != sample_b.line
    assert sample_a.sample_id == sample_b.sample_id
    assert re.fullmatch(r"[0-9a-f]{16}", sample_a.sample_id)


def test_sample_id_same_across_formats():
    one = Sample(to_messages(PROMPT_COMPLETION, "prompt_completion", path="a", line=1), "a", "a", 1, {})
    two = Sample(to_messages(MESSAGES, "messages", path="b", line=7), "b", "b", 7, {})
    assert one.sample_id == two.sample_id


@pytest.mark.parametrize("other", [
    (Message("user", "Hi"), Message("assistant", "Hello!")),
    (Message("user", "Hello"), Message("assistant", "Hi")),
    (Message("system", "Hi"), Message("assistant", "Hello")),
    (Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "More")),
    (Message("user", "Hi\u00e9"), Message("assistant", "Hello")),
])
def test_sample_id_differs_by_content(other):
    base = Sample(HI_HELLO, "s", "p", 1, {})
    assert base.sample_id != Sample(other, "s", "p", 1, {}).sample_id


# --- Invalid records ----------------------------------------------------------------------------


def turns(*pairs):
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


# Each case is (first valid record, invalid line, field, pattern of the reason).
BAD_RECORDS = [
    (MESSAGES, b"[1, 2]", None, r"not a JSON object \(got array\)"),
    (MESSAGES, b'"text"', None, r"not a JSON object \(got string\)"),
    (MESSAGES, b'{"messages": [', None, r"invalid JSON: Expecting value at column 15"),
    (MESSAGES, b"\xff\xfe{}", None, r"invalid UTF-8 at byte 0 \(re-encode the file as UTF-8\)"),
    (ALPACA, {"instruction": "Hi"}, "output", r"missing field"),
    (ALPACA, {"instruction": ["Hi"], "output": "x"}, "instruction", r"expected string, got array"),
    (ALPACA, {"instruction": "Hi", "output": "x", "input": 3}, "input", r"expected string, got number"),
    (ALPACA, {"instruction": " \n", "output": "x"}, "instruction", r"empty user content"),
    (ALPACA, {"instruction": "Hi", "output": ""}, "output", r"empty assistant content"),
    (PROMPT_COMPLETION, {"prompt": "Hi"}, "completion", r"missing field \(.*'completion' or 'response'"),
    (PROMPT_COMPLETION, {"prompt": None, "completion": "x"}, "prompt", r"missing field"),
    (MESSAGES, {"messages": "Hi"}, "messages", r"expected array, got string"),
    (MESSAGES, {"messages": ["Hi"]}, "messages[0]", r"expected object, got string"),
    (MESSAGES, turns(("user", "Hi"), ("assistant", 5)), "messages[1].content",
     r"expected string, got number"),
    (MESSAGES, {"messages": [{"role": "user"}]}, "messages[0].content", r"missing field"),
    (MESSAGES, {"messages": [{"content": "Hi"}]}, "messages[0].role", r"missing field"),
    (MESSAGES, turns(("user", "Hi"), ("assistant", "  ")), "messages[1].content", r"empty assistant content"),
    (MESSAGES, turns(("user", ""), ("assistant", "x")), "messages[0].content", r"empty user content"),
    (MESSAGES, turns(("user", "Hi"), ("tool", "x")), "messages[1].role",
     r"unknown role 'tool' \(accepted roles: system, user, assistant\)"),
    (MESSAGES, turns(("user", "Hi")), "messages", r"no assistant turn \(a sample needs a response\)"),
    (MESSAGES, turns(("system", "S"), ("assistant", "x")), "messages", r"no user turn"),
    (MESSAGES, {"messages": []}, "messages", r"no user turn"),
    (MESSAGES, turns(("user", "Hi"), ("system", "S"), ("assistant", "x")), "messages[1].role",
     r"a system turn must come first"),
    (MESSAGES, {"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}]},
     "messages[0].content[0].type", r"unsupported content part type 'image'"),
    (MESSAGES, {"messages": [{"role": "user", "content": ["Hi"]}]}, "messages[0].content[0]",
     r"expected object, got string"),
    (MESSAGES, b'{"messages": [{"role": "user", "content": "\\ud800"}, '
               b'{"role": "assistant", "content": "x"}]}',
     "messages[0].content", r"invalid Unicode: lone surrogate"),
    (SHAREGPT, {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}]},
     "conversations[1].from", r"unknown role 'robot' \(accepted values: system, human"),
    (SHAREGPT, {"conversations": [{"from": "human", "value": "Hi"}]}, "conversations", r"no assistant turn"),
    (SHAREGPT, {"conversations": {"from": "human"}}, "conversations", r"expected array, got object"),
]


@pytest.mark.parametrize("first, bad, field, reason", BAD_RECORDS)
def test_read_samples_invalid_record(tmp_path, first, bad, field, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [first, bad])
    location = r"bad\.jsonl:2: " + (f"field {re.escape(repr(field))}: " if field else "")
    with pytest.raises(InputError, match=location + reason) as caught:
        read_all(path)
    assert caught.value.line == 2
    assert caught.value.field == field


@pytest.mark.parametrize("first, bad, field, reason", BAD_RECORDS)
def test_read_samples_skip_invalid_record(tmp_path, first, bad, field, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [first, bad, first])
    skipped = []
    samples = read_all(path, on_error="skip", skipped=skipped)
    assert [sample.line for sample in samples] == [1, 3]
    assert len(skipped) == 1
    assert skipped[0].line == 2
    assert skipped[0].field == field
    assert re.match(reason, skipped[0].reason)


def test_read_samples_undetectable_format(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "Hi", "answer": "Hello"}])
    pattern = (r"odd\.jsonl:1: no record format matches the keys: answer, question "
               r"\(expected keys, alpaca: instruction, output.*sharegpt: conversations.*messages: messages"
               r".*prompt_completion: prompt, and completion or response\. Pass --format")
    with pytest.raises(InputError, match=pattern):
        read_all(path)


def test_read_samples_undetectable_raises_in_skip_mode(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "Hi"}, MESSAGES])
    with pytest.raises(InputError, match=r"odd\.jsonl:1: no record format matches"):
        read_all(path, on_error="skip")


def test_read_samples_detects_from_first_object(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [b"[1]", b"{broken", SHAREGPT])
    skipped = []
    [sample] = read_all(path, on_error="skip", skipped=skipped)
    assert sample.messages == HI_HELLO
    assert [record.line for record in skipped] == [1, 2]


def test_read_samples_stop_raises_first_error(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [MESSAGES, turns(("user", "Hi")), b"{broken"])
    samples = read_samples(path)
    assert next(samples).line == 1
    with pytest.raises(InputError, match=r"data\.jsonl:2: field 'messages': no assistant turn"):
        next(samples)


# --- Skip mode and settings ---------------------------------------------------------------------


def test_read_samples_skip_counts_and_logs(tmp_path, caplog):
    records = [MESSAGES, b"\xc3\x28", b"", turns(("user", "Hi")), MESSAGES, b"{", MESSAGES]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    skipped = []
    with caplog.at_level(logging.WARNING, logger="trimdb.records"):
        samples = read_all(path, on_error="skip", skipped=skipped)
    assert [sample.line for sample in samples] == [1, 5, 7]
    assert skipped == [
        SkippedRecord(str(path), 2, None, "invalid UTF-8 at byte 0 (re-encode the file as UTF-8)"),
        SkippedRecord(str(path), 4, "messages", "no assistant turn (a sample needs a response)"),
        SkippedRecord(str(path), 6, None, "invalid JSON: Expecting property name enclosed in double quotes"
                                          " at column 2"),
    ]
    assert len(caplog.records) == 1
    assert "mixed.jsonl: skipped 3 of 6 records" in caplog.records[0].getMessage()


def test_read_samples_skip_without_list(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [b"{", MESSAGES])
    assert len(read_all(path, on_error="skip")) == 1


@pytest.mark.parametrize("options, pattern", [
    ({"on_error": "ignore"}, r"invalid on_error 'ignore': expected one of stop, skip"),
    ({"format": "chatml"}, r"unknown format 'chatml': expected one of alpaca, sharegpt"),
])
def test_read_samples_invalid_settings(tmp_path, options, pattern):
    path = write_jsonl(tmp_path / "data.jsonl", [MESSAGES])
    with pytest.raises(SettingsError, match=pattern):
        read_samples(path, **options)
    with pytest.raises(SettingsError, match=pattern):
        read_corpus([path], **options)


# --- Sources ------------------------------------------------------------------------------------


def test_read_samples_explicit_source_wins(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{**MESSAGES, "origin": "web"}])
    [sample] = read_all(path, source="mine", source_column="origin")
    assert sample.source == "mine"


@pytest.mark.parametrize("value, expected", [("web", "web"), (7, "7")])
def test_read_samples_source_column(tmp_path, value, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [{**MESSAGES, "origin": value}])
    [sample] = read_all(path, source_column="origin")
    assert sample.source == expected


@pytest.mark.parametrize("record, reason", [
    (MESSAGES, r"missing source column"),
    ({**MESSAGES, "origin": None}, r"expected string, got null"),
    ({**MESSAGES, "origin": [1]}, r"expected string, got array"),
    ({**MESSAGES, "origin": ""}, r"empty source value"),
])
def test_read_samples_source_column_invalid(tmp_path, record, reason):
    path = write_jsonl(tmp_path / "data.jsonl", [record])
    with pytest.raises(InputError, match=r"data\.jsonl:1: field 'origin': " + reason):
        read_all(path, source_column="origin")


@pytest.mark.parametrize("name, stem", [
    ("web.chat.jsonl", "web.chat"), ("web.ndjson", "web"), ("web.json", "web"),
    ("web.jsonl.gz", "web"), ("WEB.JSONL", "WEB"),
])
def test_read_samples_source_from_stem(tmp_path, name, stem):
    path = tmp_path / name
    data = (json.dumps(MESSAGES) + "\n").encode("utf-8")
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    [sample] = read_all(path)
    assert sample.source == stem


# --- File types ---------------------------------------------------------------------------------


def test_read_samples_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    text = "\n" + json.dumps(MESSAGES) + "\n   \n\r\n" + json.dumps(MESSAGES_2) + "\r\n\n"
    path.write_text(text, encoding="utf-8")
    samples = read_all(path)
    assert [sample.line for sample in samples] == [2, 5]


def test_read_samples_byte_order_mark(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(MESSAGES).encode("utf-8") + b"\n")
    assert read_all(path)[0].messages == HI_HELLO


def test_read_samples_empty_file_warns(tmp_path, caplog):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="trimdb.records"):
        assert read_all(path) == []
    assert "empty.jsonl contains no records" in caplog.text


@pytest.mark.parametrize("document", [
    [SHAREGPT, MESSAGES, SHAREGPT],
    {"data": [SHAREGPT, MESSAGES, SHAREGPT]},
])
def test_read_samples_json_array(tmp_path, document):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    skipped = []
    samples = read_all(path, on_error="skip", skipped=skipped)
    assert [sample.line for sample in samples] == [1, 3]
    assert all(sample.messages == HI_HELLO for sample in samples)
    assert [(record.line, record.field) for record in skipped] == [(2, "conversations")]


def test_read_samples_json_single_record(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(MESSAGES), encoding="utf-8")
    [sample] = read_all(path)
    assert sample.messages == HI_HELLO


def test_read_samples_json_that_is_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "data.json", [MESSAGES, b"", MESSAGES_2])
    assert [sample.line for sample in read_all(path)] == [1, 3]


def test_read_samples_json_element_error(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([MESSAGES, MESSAGES, "oops"]), encoding="utf-8")
    with pytest.raises(InputError, match=r"data\.json:3: not a JSON object \(got string\)"):
        read_all(path)


@pytest.mark.parametrize("content, pattern", [
    (b'[{"messages": ]', r"data\.json: invalid JSON: Expecting value at line 1 column 15"),
    (b'[\n{"messages":\n', r"data\.json: invalid JSON: Expecting value at line 3 column 1"),
    (b'"just text"', r"data\.json: expected a JSON array of records, got string"),
    (b'["\xff"]', r"data\.json: invalid UTF-8 at byte 2"),
])
def test_read_samples_json_invalid_document(tmp_path, content, pattern):
    path = tmp_path / "data.json"
    path.write_bytes(content)
    with pytest.raises(InputError, match=pattern):
        read_all(path)


def test_read_samples_gzip(tmp_path):
    path = tmp_path / "data.json.gz"
    path.write_bytes(gzip.compress(json.dumps([MESSAGES, MESSAGES_2]).encode("utf-8")))
    assert [sample.line for sample in read_all(path)] == [1, 2]


def test_read_samples_corrupt_gzip(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match=r"data\.jsonl\.gz: failed to read file: Not a gzipped file"):
        read_all(path)


def test_read_samples_parquet_round_trip(tmp_path):
    rows = 2100  # More than two Parquet batches, so the line numbers cross batch boundaries.
    stamp = datetime.datetime(2024, 5, 1, 12, 30)
    table = pa.table({
        "messages": [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
                     for i in range(rows)],
        "origin": ["web" if i % 2 else "books" for i in range(rows)],
        "created": [stamp] * rows,
        "blob": [b"\x00\xff", *([b"text"] * (rows - 1))],
    })
    path = tmp_path / "pool.parquet"
    pq.write_table(table, path, row_group_size=500)
    samples = read_all(path, source_column="origin")
    assert [sample.line for sample in samples] == list(range(1, rows + 1))
    assert samples[3].messages == (Message("user", "q3"), Message("assistant", "a3"))
    assert samples[3].source == "web"
    assert samples[0].record["created"] == "2024-05-01T12:30:00"
    assert samples[0].record["blob"] == "AP8="
    assert samples[1].record["blob"] == "text"
    json.dumps([sample.record for sample in samples])


def test_read_samples_parquet_invalid_row(tmp_path):
    table = pa.table({"prompt": ["Hi", "Hi", "Hi"], "completion": ["Hello", " ", "Hello"]})
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path)
    with pytest.raises(InputError, match=r"pairs\.parquet:2: field 'completion': empty assistant content"):
        read_all(path)


def test_read_samples_not_parquet(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(InputError, match=r"fake\.parquet: failed to read Parquet file"):
        read_all(path)


def test_read_samples_unknown_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"data\.csv: unsupported file extension '\.csv' "
                                         r"\(supported extensions: \.jsonl, \.ndjson, \.json, \.parquet"):
        read_samples(path)


def test_read_samples_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"absent\.jsonl: path not found"):
        read_samples(tmp_path / "absent.jsonl")


def test_read_corpus_missing_directory(tmp_path):
    with pytest.raises(InputError, match=r"corpus: path not found"):
        read_corpus([tmp_path / "corpus"])


def test_read_samples_directory(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(InputError, match=r"dir\.jsonl: not a file"):
        read_samples(tmp_path / "dir.jsonl")


# --- Corpora ------------------------------------------------------------------------------------


def test_read_corpus_directory_expansion(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [MESSAGES, MESSAGES_2])
    (tmp_path / "a.json").write_text(json.dumps([ALPACA]), encoding="utf-8")
    pq.write_table(pa.table({"prompt": ["Hi"], "response": ["Hello"]}), tmp_path / "c.parquet")
    (tmp_path / "notes.txt").write_text("not a corpus", encoding="utf-8")
    (tmp_path / "nested").mkdir()
    write_jsonl(tmp_path / "nested" / "0.jsonl", [MESSAGES])
    samples = list(read_corpus(tmp_path))
    assert [(sample.source, sample.line) for sample in samples] == [("a", 1), ("b", 1), ("b", 2), ("c", 1)]


def test_read_corpus_files_in_order(tmp_path):
    second = write_jsonl(tmp_path / "z.jsonl", [SHAREGPT])
    first = write_jsonl(tmp_path / "a.jsonl", [MESSAGES])
    samples = list(read_corpus([second, str(first)]))
    assert [sample.source for sample in samples] == ["z", "a"]


def test_read_corpus_checks_paths_first(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [MESSAGES])
    with pytest.raises(InputError, match=r"missing\.jsonl: path not found"):
        read_corpus([good, tmp_path / "missing.jsonl"])


def test_read_corpus_empty_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match=r"directory contains no corpus files \(supported extensions"):
        read_corpus([tmp_path])


def test_read_corpus_skipped_across_files(tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [MESSAGES, b"{"])
    two = write_jsonl(tmp_path / "two.jsonl", [b"[]", SHAREGPT])
    skipped = []
    samples = list(read_corpus([one, two], on_error="skip", skipped=skipped))
    assert len(samples) == 2
    assert [(record.path, record.line) for record in skipped] == [(str(one), 2), (str(two), 1)]
