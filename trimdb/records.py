"""Read corpus and target files into normalized samples.

This is the first pipeline stage: every later stage (rendering, forward pass, indexing) takes the
``Sample`` objects yielded here. Supported files are JSONL (``.jsonl``, ``.ndjson``), JSON
(``.json``), their gzip variants (``.gz``) and Parquet (``.parquet``). Supported record formats are
alpaca, sharegpt, messages and prompt_completion. Duplicates are yielded as they come.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import gzip
import hashlib
import itertools
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trimdb.errors import InputError, SettingsError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion")
ON_ERROR = ("stop", "skip")
SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".jsonl.gz", ".ndjson.gz", ".json.gz")

# The keys that identify each format, as shown in the error for an undetectable record.
FORMAT_KEYS = {
    "alpaca": "instruction, output (optional: input, system)",
    "sharegpt": "conversations (turns with from/value or role/content)",
    "messages": "messages (turns with role/content)",
    "prompt_completion": "prompt, and completion or response",
}
# ShareGPT speaker names, compared in lower case.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
}
# Rows per Parquet batch: bounds memory to one batch of rows, not the whole file.
PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Message:
    """One conversation turn: a role from ROLES and its text."""

    role: str
    content: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"invalid role {self.role!r}: expected one of {', '.join(ROLES)}")


@dataclass(frozen=True)
class Sample:
    """One normalized conversation with the file location and the original record."""

    messages: tuple[Message, ...]
    source: str
    path: str
    line: int
    # The record is left out of equality and hashing because dicts are unhashable.
    record: dict = field(compare=False)

    @property
    def sample_id(self) -> str:
        """Hash the (role, content) pairs, so equal conversations share an id across files."""
        pairs = [[message.role, message.content] for message in self.messages]
        # ensure_ascii keeps lone surrogates encodable, so every string has one canonical form.
        payload = json.dumps(pairs, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode("ascii")).hexdigest()[:16]


@dataclass
class SkippedRecord:
    """A record dropped in skip mode, with the reason from its InputError."""

    path: str
    line: int | None
    field: str | None
    reason: str


class _Turn(NamedTuple):
    role: str
    content: str
    role_field: str
    content_field: str


def detect_format(record: dict) -> str | None:
    """Return the format that the record's keys match, or None when none matches."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and ("completion" in record or "response" in record):
        return "prompt_completion"
    return None


def to_messages(record: dict, format: str, *, path, line) -> tuple[Message, ...]:
    """Convert one record of the given format into messages.

    Raises InputError naming the path, line and field when the record is invalid.
    """
    converters = {
        "alpaca": _alpaca_turns,
        "sharegpt": _sharegpt_turns,
        "messages": _messages_turns,
        "prompt_completion": _prompt_completion_turns,
    }
    if format not in converters:
        raise SettingsError(f"unknown format {format!r}: expected one of {', '.join(FORMATS)}")
    turns = converters[format](record, str(path), line)
    _check_turns(turns, "conversations" if format == "sharegpt" else "messages", str(path), line)
    return tuple(Message(turn.role, turn.content) for turn in turns)


def read_samples(path, *, format: str | None = None, source: str | None = None,
                 source_column: str | None = None, on_error: str = "stop",
                 skipped: list[SkippedRecord] | None = None) -> Iterator[Sample]:
    """Read one file into samples, detecting the format from its first object record.

    Settings and the file itself are checked before this returns. Invalid records raise
    InputError when on_error is "stop", and are appended to ``skipped`` when it is "skip".
    """
    options = _ReadOptions(format, source, source_column, on_error, skipped)
    return _read_file(_check_file(Path(path)), options)


def read_corpus(paths, *, format: str | None = None, source: str | None = None,
                source_column: str | None = None, on_error: str = "stop",
                skipped: list[SkippedRecord] | None = None) -> Iterator[Sample]:
    """Read many files in order, expanding each directory to its supported files by name.

    Every path is checked before the first record is read. Options are as in read_samples.
    """
    options = _ReadOptions(format, source, source_column, on_error, skipped)
    files = list_corpus_files(paths)
    return itertools.chain.from_iterable(_read_file(path, options) for path in files)


def list_corpus_files(paths) -> list[Path]:
    """Return the files to read, with directories expanded (not recursively) and sorted by name."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = []
    for path in map(Path, paths):
        if not path.is_dir():
            files.append(_check_file(path))
            continue
        found = sorted((p for p in path.iterdir() if p.is_file() and _suffix(p)), key=lambda p: p.name)
        if not found:
            raise InputError(path, None, None, "directory contains no corpus files",
                             f"supported extensions: {', '.join(SUFFIXES)}")
        files.extend(found)
    return files


@dataclass(frozen=True)
class _ReadOptions:
    format: str | None
    source: str | None
    source_column: str | None
    on_error: str
    skipped: list[SkippedRecord] | None

    def __post_init__(self):
        if self.format is not None and self.format not in FORMATS:
            raise SettingsError(f"unknown format {self.format!r}: expected one of {', '.join(FORMATS)}")
        if self.on_error not in ON_ERROR:
            raise SettingsError(f"invalid on_error {self.on_error!r}: expected one of {', '.join(ON_ERROR)}")


class _SkipLog:
    """Raise or collect record errors for one file, and log one warning for the file."""

    def __init__(self, path: Path, options: _ReadOptions):
        self.path, self.options = path, options
        self.count, self.first = 0, ""

    def add(self, error: InputError) -> None:
        if self.options.on_error == "stop":
            raise error
        self.count += 1
        if self.options.skipped is not None:
            reason = f"{error.reason} ({error.hint})" if error.hint else error.reason
            self.options.skipped.append(SkippedRecord(error.path, error.line, error.field, reason))
        if self.count == 1:
            self.first = str(error)

    def close(self, total: int) -> None:
        if self.count:
            logger.warning("%s: skipped %d of %d records; first: %s",
                           self.path, self.count, total, self.first)


def _read_file(path: Path, options: _ReadOptions) -> Iterator[Sample]:
    """Yield the samples of one checked file; see read_samples."""
    skip_log = _SkipLog(path, options)
    record_format = options.format
    total = 0
    for line, value in _iter_values(path):
        total += 1
        try:
            record = _as_record(value, path, line)
        except InputError as error:
            skip_log.add(error)
            continue
        # The format of the first object record holds for the whole file, in skip mode too.
        record_format = record_format or _detect_or_raise(record, path, line)
        try:
            sample = _to_sample(record, record_format, path, line, options)
        except InputError as error:
            skip_log.add(error)
            continue
        yield sample
    skip_log.close(total)
    if total == 0:
        logger.warning("%s contains no records", path)


def _to_sample(record: dict, record_format: str, path: Path, line: int, options: _ReadOptions) -> Sample:
    messages = to_messages(record, record_format, path=path, line=line)
    _check_unicode(record, path, line)
    source = options.source or _column_source(record, options.source_column, path, line) or _stem(path)
    return Sample(messages, source, str(path), line, record)


def _check_unicode(record: dict, path: Path, line: int) -> None:
    """Raise InputError naming a key or string with a lone surrogate, which UTF-8 cannot store.

    JSON allows such escapes (a lone \\ud800), but the stored record must be valid UTF-8.
    """
    stack: list[tuple[str, Any]] = [("", record)]  # iterative, so deep nesting cannot overflow
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                name = f"{where}.{_escaped(key)}" if where else _escaped(key)
                _check_text(str(key), name, path, line)
                stack.append((name, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{index}]", item) for index, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, where, path, line)


def _check_text(text: str, where: str, path: Path, line: int) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(path, line, where, f"invalid Unicode: lone surrogate at character {error.start}",
                         "a \\uD800-\\uDFFF escape must be half of a surrogate pair") from error


def _escaped(key: Any) -> str:
    """Return a key as text that UTF-8 can store, with any lone surrogate as a backslash escape."""
    return str(key).encode("utf-8", "backslashreplace").decode("utf-8")


def _column_source(record: dict, column: str | None, path: Path, line: int) -> str | None:
    if column is None:
        return None
    if column not in record:
        raise InputError(path, line, column, "missing source column",
                         "every record needs the column named by source_column")
    value = record[column]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(path, line, column, f"expected string, got {_json_type(value)}")
    if value == "":
        raise InputError(path, line, column, "empty source value")
    return str(value)


def _detect_or_raise(record: dict, path: Path, line: int) -> str:
    detected = detect_format(record)
    if detected is None:
        found = ", ".join(sorted(map(str, record))[:20]) or "none"
        expected = "; ".join(f"{name}: {keys}" for name, keys in FORMAT_KEYS.items())
        raise InputError(path, line, None, f"no record format matches the keys: {found}",
                         f"expected keys, {expected}. Pass --format to choose one")
    return detected


def _as_record(value: Any, path: Path, line: int) -> dict:
    if isinstance(value, InputError):
        raise value
    if not isinstance(value, dict):
        raise InputError(path, line, None, f"not a JSON object (got {_json_type(value)})")
    return value


# --- Files --------------------------------------------------------------------------------------


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((suffix for suffix in SUFFIXES if name.endswith(suffix)), None)


def _stem(path: Path) -> str:
    return path.name[: -len(_suffix(path))]


def _check_file(path: Path) -> Path:
    if not path.exists():
        raise InputError(path, None, None, "path not found")
    if not path.is_file():
        raise InputError(path, None, None, "not a file", "pass a file, or a directory to read_corpus")
    if _suffix(path) is None:
        raise InputError(path, None, None, f"unsupported file extension {path.suffix!r}",
                         f"supported extensions: {', '.join(SUFFIXES)}")
    return path


def _iter_values(path: Path) -> Iterator[tuple[int, Any]]:
    """Return an iterator of (line, value) pairs.

    The value of a line that cannot be decoded is its InputError, so skip mode can go on.
    """
    suffix = _suffix(path)
    if suffix == ".parquet":
        return _iter_parquet(path)
    if suffix in (".json", ".json.gz"):
        return _iter_json(path)
    return _iter_jsonl(path)


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


_BLANK = object()  # Marks a blank JSONL line, which is skipped without an error.


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with _open_binary(path) as handle:
            for line, raw in enumerate(handle, start=1):
                value = _decode_line(raw, path, line)
                if value is not _BLANK:
                    yield line, value
    except (OSError, EOFError) as error:
        raise InputError(path, None, None, f"failed to read file: {error}") from error


def _decode_line(raw: bytes, path: Path, line: int) -> Any:
    try:
        text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as error:
        return InputError(path, line, None, f"invalid UTF-8 at byte {error.start}",
                          "re-encode the file as UTF-8")
    if not text.strip():
        return _BLANK
    try:
        # Without the line break, an error at the end of the line reports this line's column.
        return json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as error:
        return InputError(path, line, None, f"invalid JSON: {error.msg} at column {error.colno}")
    except (ValueError, RecursionError) as error:
        return InputError(path, line, None, f"invalid JSON: {_parser_limit(error)}")


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    document = _load_json(path)
    if document is _JSONL_CONTENT:
        return _iter_jsonl(path)
    return enumerate(_json_records(document, path), start=1)


_JSONL_CONTENT = object()  # Marks a .json file that contains one JSON value per line.


def _load_json(path: Path) -> Any:
    # NOTE: a JSON document is parsed whole, so a .json file must fit in memory. JSONL streams.
    try:
        with _open_binary(path) as handle:
            text = handle.read().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(path, None, None, f"invalid UTF-8 at byte {error.start}",
                         "re-encode the file as UTF-8") from error
    except (OSError, EOFError) as error:
        raise InputError(path, None, None, f"failed to read file: {error}") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # Several top-level values, so the file is JSONL.
            return _JSONL_CONTENT
        raise InputError(path, None, None,
                         f"invalid JSON: {error.msg} at line {error.lineno} column {error.colno}") from error
    except (ValueError, RecursionError) as error:
        raise InputError(path, None, None, f"invalid JSON: {_parser_limit(error)}") from error


def _parser_limit(error: ValueError | RecursionError) -> str:
    """Describe the limit of Python's JSON parser that well-formed JSON exceeded."""
    if isinstance(error, RecursionError):
        return f"arrays or objects nested too deeply for Python's parser (recursion limit {sys.getrecursionlimit()})"
    if "integer string conversion" in str(error):
        # Python 3.11 and later reject integers longer than sys.get_int_max_str_digits() digits.
        return f"an integer has more than {sys.get_int_max_str_digits()} digits, Python's limit; write it as a string"
    return str(error)


def _json_records(document: Any, path: Path) -> list:
    """Return the records of a JSON array, of a {"key": [...]} wrapper, or of a single record."""
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        values = list(document.values())
        # {"messages": [...]} is one record, while {"data": [...]} wraps the records.
        if len(values) == 1 and isinstance(values[0], list) and detect_format(document) is None:
            return values[0]
        return [document]
    raise InputError(path, None, None, f"expected a JSON array of records, got {_json_type(document)}")


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with pq.ParquetFile(path) as parquet_file:
            batches = parquet_file.iter_batches(batch_size=PARQUET_BATCH_ROWS)
            rows = itertools.chain.from_iterable(batch.to_pylist() for batch in batches)
            for line, row in enumerate(rows, start=1):
                yield line, _to_json_value(row)
    except (pa.ArrowException, OSError) as error:
        raise InputError(path, None, None, f"failed to read Parquet file: {error}") from error


def _to_json_value(value: Any) -> Any:
    """Convert a Parquet value to plain JSON types: dates become ISO strings, bytes UTF-8 or base64."""
    if isinstance(value, dict):
        return {str(key): _to_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json_value(item) for item in value]
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    if isinstance(value, np.generic):
        return value.item()
    return value


# --- Formats ------------------------------------------------------------------------------------


def _alpaca_turns(record: dict, path: str, line: int) -> list[_Turn]:
    instruction = _string_field(record, "instruction", path, line)
    output = _string_field(record, "output", path, line)
    extra_input = _string_field(record, "input", path, line, required=False)
    system = _string_field(record, "system", path, line, required=False)
    user = instruction + ("\n\n" + extra_input if extra_input.strip() else "")
    turns = [_Turn("system", system, "system", "system")] if system.strip() else []
    return turns + [_Turn("user", user, "instruction", "instruction"),
                    _Turn("assistant", output, "output", "output")]


def _prompt_completion_turns(record: dict, path: str, line: int) -> list[_Turn]:
    prompt = _string_field(record, "prompt", path, line)
    key = "response" if "completion" not in record and "response" in record else "completion"
    if key not in record:
        raise InputError(path, line, "completion", "missing field",
                         "a prompt_completion record needs 'completion' or 'response'")
    completion = _string_field(record, key, path, line)
    return [_Turn("user", prompt, "prompt", "prompt"), _Turn("assistant", completion, key, key)]


def _messages_turns(record: dict, path: str, line: int) -> list[_Turn]:
    turns = []
    for where, turn in _turn_list(record, "messages", path, line):
        role = _string_field(turn, "role", path, line, prefix=where)
        if role not in ROLES:
            raise InputError(path, line, f"{where}.role", f"unknown role {role!r}",
                             f"accepted roles: {', '.join(ROLES)}")
        content = _content(turn, "content", path, line, where)
        turns.append(_Turn(role, content, f"{where}.role", f"{where}.content"))
    return turns


def _sharegpt_turns(record: dict, path: str, line: int) -> list[_Turn]:
    turns = []
    for where, turn in _turn_list(record, "conversations", path, line):
        role_key, content_key = ("from", "value")
        if "from" not in turn and "role" in turn:
            role_key, content_key = ("role", "content")
        speaker = _string_field(turn, role_key, path, line, prefix=where)
        if speaker.lower() not in SHAREGPT_ROLES:
            raise InputError(path, line, f"{where}.{role_key}", f"unknown role {speaker!r}",
                             f"accepted values: {', '.join(SHAREGPT_ROLES)}")
        content = _content(turn, content_key, path, line, where)
        turns.append(_Turn(SHAREGPT_ROLES[speaker.lower()], content, f"{where}.{role_key}",
                           f"{where}.{content_key}"))
    return turns


def _turn_list(record: dict, key: str, path: str, line: int) -> Iterator[tuple[str, dict]]:
    """Yield ("key[i]", turn) for each turn of a list-valued field, checking the types."""
    if key not in record:
        raise InputError(path, line, key, "missing field")
    turns = record[key]
    if not isinstance(turns, list):
        raise InputError(path, line, key, f"expected array, got {_json_type(turns)}")
    for index, turn in enumerate(turns):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise InputError(path, line, where, f"expected object, got {_json_type(turn)}")
        yield where, turn


def _string_field(record: dict, key: str, path: str, line: int, *, required: bool = True,
                  prefix: str = "") -> str:
    """Return record[key] as a string, or "" for an optional field that is absent or null."""
    name = f"{prefix}.{key}" if prefix else key
    if key not in record or record[key] is None:
        if required:
            raise InputError(path, line, name, "missing field")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise InputError(path, line, name, f"expected string, got {_json_type(value)}")
    return value


def _content(turn: dict, key: str, path: str, line: int, where: str) -> str:
    """Return a turn's content: a string, or a list of text parts joined without a separator."""
    value = turn.get(key)
    if not isinstance(value, list):
        return _string_field(turn, key, path, line, prefix=where)
    texts = []
    for index, part in enumerate(value):
        name = f"{where}.{key}[{index}]"
        if not isinstance(part, dict):
            raise InputError(path, line, name, f"expected object, got {_json_type(part)}")
        if part.get("type") != "text":
            raise InputError(path, line, f"{name}.type",
                             f"unsupported content part type {part.get('type')!r}",
                             "only 'text' parts are supported")
        texts.append(_string_field(part, "text", path, line, prefix=name))
    # No separator is added, so a text that was split into parts reads as it was written.
    return "".join(texts)


def _check_turns(turns: list[_Turn], container: str, path: str, line: int) -> None:
    """Raise InputError unless the turns form a sample that the later stages can render."""
    for index, turn in enumerate(turns):
        if turn.role == "system" and index > 0:
            raise InputError(path, line, turn.role_field, "a system turn must come first")
        if turn.role != "system" and not turn.content.strip():
            raise InputError(path, line, turn.content_field, f"empty {turn.role} content")
        try:
            turn.content.encode("utf-8")
        except UnicodeEncodeError as error:
            raise InputError(path, line, turn.content_field,
                             f"invalid Unicode: lone surrogate at character {error.start}") from error
    roles = {turn.role for turn in turns}
    if "user" not in roles:
        raise InputError(path, line, container, "no user turn", "a sample needs at least one user turn")
    if "assistant" not in roles:
        raise InputError(path, line, container, "no assistant turn", "a sample needs a response")


def _json_type(value: Any) -> str:
    """Return the JSON name of a value's type, for error messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
