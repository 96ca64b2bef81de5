"""Commit one indexed segment: its vector file, then its rows, in one DuckDB transaction.

A segment is the unit of durability. Its vector file is written under a temporary name and
renamed. The rows that reference it (samples, tokens, the segment row, and for a run's first
segment the run row and the catalog) are committed afterwards in one transaction. A crash
loses at most the segment being written, and the file it leaves behind is unreferenced, so the
next writing run deletes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from trimdb.records import Sample, SkippedRecord
from trimdb.render import PROMPT, RESPONSE, RenderedSample
from trimdb.selection import normalized_text_hash
from trimdb.store import Store


@dataclass
class PendingSample:
    """A rendered sample waiting for its forward pass, and then its in-scope token rows."""

    sample: Sample
    rendered: RenderedSample
    rows: dict | None = None


def commit_segment(store: Store, pending: list[PendingSample], run: dict, codec: str) -> int:
    """Write the vectors of ``pending`` as a new segment and commit their rows; return the token count.

    ``run`` contains run_id, arguments, settings and identity. The run row and the catalog are
    written with the run's first segment, so a run that fails before it leaves no trace.
    """
    first_sample_key = store.next_id("samples", "sample_key")
    first_token_key = store.next_id("tokens", "token_key")
    segment_id = store.next_id("segments", "segment_id")
    counts = np.array([len(p.rows["positions"]) for p in pending], dtype=np.int64)
    token_keys = first_token_key + np.arange(int(counts.sum()), dtype=np.int64)
    vectors = np.concatenate([p.rows["vectors"] for p in pending])

    file_name, file_bytes = store.write_segment(segment_id, vectors, token_keys, codec)
    try:
        with store.transaction() as connection:
            if not run.get("started"):
                store.insert_run(connection, run["run_id"], "index", run["arguments"], run["settings"])
                if not store.catalog():
                    _write_catalog(connection, run["identity"], run["settings"])
            source_ids = _write_sources(store, connection, pending, run["run_id"])
            _write_samples(store, connection, pending, source_ids, run["run_id"], first_sample_key)
            _write_tokens(store, connection, pending, counts, token_keys, first_sample_key)
            connection.execute(
                "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [segment_id, run["run_id"], file_name, len(token_keys), int(token_keys[0]), int(token_keys[-1]),
                 vectors.shape[1], codec, file_bytes],
            )
    except BaseException:
        (store.vectors_dir / file_name).unlink(missing_ok=True)
        raise
    run["started"] = True
    return len(token_keys)


def finish_index_run(store: Store, run: dict, skipped: list[SkippedRecord], stats: dict) -> None:
    """Record the run's skipped records and counts; create the run row if no segment did."""
    with store.transaction() as connection:
        if not run.get("started"):
            store.insert_run(connection, run["run_id"], "index", run["arguments"], run["settings"])
            if not store.catalog():
                _write_catalog(connection, run["identity"], run["settings"])
        for record in skipped:
            connection.execute(
                "INSERT INTO skipped VALUES (?, ?, ?, ?, ?)",
                [run["run_id"], str(record.path), record.line, record.field, record.reason],
            )
        store.finish_run(connection, run["run_id"], stats)
    run["started"] = True


def _write_catalog(connection, identity: dict, settings: dict) -> None:
    for key, value in (("model", identity), ("index_settings", settings)):
        connection.execute("INSERT INTO catalog VALUES (?, ?)", [key, json.dumps(value)])


def _write_sources(store, connection, pending, run_id) -> dict[str, int]:
    source_ids = dict(connection.execute("SELECT name, source_id FROM sources").fetchall())
    next_id = max(source_ids.values(), default=0) + 1
    for name in dict.fromkeys(p.sample.source for p in pending):
        if name not in source_ids:
            connection.execute("INSERT INTO sources VALUES (?, ?, ?)", [next_id, name, run_id])
            source_ids[name] = next_id
            next_id += 1
    return source_ids


def _write_samples(store, connection, pending, source_ids, run_id, first_key) -> None:
    rows = [p.rows for p in pending]
    table = pa.table({
        "sample_key": pa.array(first_key + np.arange(len(pending)), pa.int64()),
        "sample_id": [p.sample.sample_id for p in pending],
        "source_id": pa.array([source_ids[p.sample.source] for p in pending], pa.int32()),
        "run_id": pa.array([run_id] * len(pending), pa.int32()),
        "path": [str(p.sample.path) for p in pending],
        "line": pa.array([p.sample.line for p in pending], pa.int32()),
        "n_turns": pa.array([len(p.sample.messages) for p in pending], pa.int32()),
        "n_tokens": pa.array([len(r["positions"]) for r in rows], pa.int32()),
        "n_prompt_tokens": pa.array([int((r["parts"] == PROMPT).sum()) for r in rows], pa.int32()),
        "n_response_tokens": pa.array([int((r["parts"] == RESPONSE).sum()) for r in rows], pa.int32()),
        "truncated": [bool(p.rendered.truncated) for p in pending],
        "record": [json.dumps(p.sample.record, ensure_ascii=False, default=str) for p in pending],
        "text_hash": [normalized_text_hash(p.sample.messages) for p in pending],
    })
    store.insert_arrow(connection, "samples", table)


def _write_tokens(store, connection, pending, counts, token_keys, first_sample_key) -> None:
    rows = [p.rows for p in pending]
    has_saliency = rows[0]["saliency"] is not None
    table = pa.table({
        "token_key": token_keys,
        "sample_key": np.repeat(first_sample_key + np.arange(len(rows), dtype=np.int64), counts),
        "position": np.concatenate([r["positions"] for r in rows]).astype(np.int32),
        "token_class": np.concatenate([r["classes"] for r in rows]),
        "part": np.concatenate([r["parts"] for r in rows]),
        "saliency": (np.concatenate([r["saliency"] for r in rows]).astype(np.float32) if has_saliency
                     else pa.nulls(len(token_keys), pa.float32())),
    })
    store.insert_arrow(connection, "tokens", table)
