"""`trimdb index`: forward passes over a corpus once, storing every content token's state.

Stages, in order:
1. read and render every record (all input errors surface before any forward pass);
2. skip samples whose content id is already indexed or repeated in this run, and list them;
3. batched forward passes, with eager attention on the last L layers when saliency is stored;
4. write the run's vector segment, then commit its rows in one transaction.

Only prompt and response content tokens are stored; template scaffolding and special tokens are
identical across samples and never in scope.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from trimdb.errors import InputError, RenderError, SettingsError, StorageError
from trimdb.forward import attention_modules, encode
from trimdb.models import LoadedModel, check_identity, load_model
from trimdb.records import Sample, SkippedRecord, read_corpus
from trimdb.render import PROMPT, RESPONSE, TEMPLATE, RenderedSample, Renderer
from trimdb.saliency import blend_saliency
from trimdb.selection import normalized_text_hash
from trimdb.settings import IndexSettings
from trimdb.store import SEGMENT_CODEC, Store

log = logging.getLogger(__name__)


@dataclass
class IndexSummary:
    """Counts of one index run: samples and tokens stored, records skipped, time and disk use."""

    run_id: int | None
    n_samples: int
    n_tokens: int
    n_truncated: int
    n_forward_tokens: int = 0
    skipped: list[SkippedRecord] = field(default_factory=list)
    n_duplicates: int = 0
    bytes_on_disk: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.n_forward_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "n_samples": self.n_samples, "n_tokens": self.n_tokens, "n_forward_tokens": self.n_forward_tokens,
            "n_truncated": self.n_truncated,
            "n_skipped": len(self.skipped) - self.n_duplicates, "n_duplicates": self.n_duplicates,
            "bytes_on_disk": self.bytes_on_disk, "seconds": round(self.seconds, 3),
        }


@dataclass
class _Pending:
    sample: Sample
    rendered: RenderedSample


def index_corpus(
    db_path: str | Path,
    paths: Sequence[str | Path],
    *,
    model: str | None = None,
    settings: IndexSettings = IndexSettings(),
    format: str | None = None,
    source: str | None = None,
    source_column: str | None = None,
    on_error: str = "stop",
    progress: bool = True,
    arguments: dict | None = None,
) -> IndexSummary:
    """Index the records of ``paths`` into the database at ``db_path`` (created when missing)."""
    settings.validate()
    if not paths:
        raise SettingsError("no corpus files given; pass at least one JSONL, JSON or Parquet file or a folder")
    started = time.perf_counter()
    loaded = load_model(model, dtype=settings.dtype)
    if settings.store_saliency:
        attention_modules(loaded.model, settings.saliency.layers)  # checks --layers before the database opens
    renderer = Renderer(loaded.tokenizer, max_length=settings.max_length, plain_template=settings.plain_template or None)
    identity = loaded.identity(renderer.template_sha256)

    created = not Path(db_path).exists()
    try:
        with Store(db_path, create=True) as store:
            summary = _index(store, paths, loaded, renderer, identity, settings, format, source, source_column,
                             on_error, progress, arguments or {}, started)
    except BaseException:
        if created:
            _remove_database(Path(db_path))
        raise
    summary.seconds = time.perf_counter() - started
    return summary


def _index(store, paths, loaded, renderer, identity, settings, format, source, source_column, on_error, progress,
           arguments, started) -> IndexSummary:
    _check_catalog(store, identity, settings)
    store.remove_orphan_segments()
    skipped: list[SkippedRecord] = []
    pending, n_duplicates = _read_and_render(store, paths, renderer, skipped, format, source, source_column, on_error)
    log.info("read %d new samples, skipped %d records (%d duplicates)", len(pending), len(skipped), n_duplicates)
    rows = _forward(loaded, pending, settings, progress)
    summary = IndexSummary(
        run_id=None, n_samples=len(pending), n_tokens=int(sum(len(r["keys"]) for r in rows)),
        n_truncated=sum(p.rendered.truncated for p in pending),
        n_forward_tokens=sum(len(p.rendered.input_ids) for p in pending),
        skipped=skipped, n_duplicates=n_duplicates,
    )
    summary.run_id = _write(store, identity, settings, pending, rows, summary, arguments, started)
    summary.bytes_on_disk = store.size_bytes()
    return summary


def _remove_database(path: Path) -> None:
    """Delete a database that a failed run created, so the failure leaves nothing behind."""
    for leftover in (path, Path(f"{path}.wal")):
        leftover.unlink(missing_ok=True)
    vectors = Path(f"{path}.vectors")
    if vectors.is_dir():
        for file in vectors.iterdir():
            file.unlink()
        vectors.rmdir()


def _check_catalog(store: Store, identity: dict, settings: IndexSettings) -> None:
    catalog = store.catalog()
    if "model" not in catalog:
        return
    check_identity(catalog["model"], identity)
    stored = catalog["index_settings"]
    current = settings.to_dict()
    differences = [key for key in ("max_length", "store_saliency", "saliency", "plain_template") if stored.get(key) != current.get(key)]
    if differences:
        details = "; ".join(f"{key}: index {stored.get(key)!r}, now {current.get(key)!r}" for key in differences)
        raise SettingsError(
            f"{store.path} was built with other index settings ({details}); rerun with the index's settings "
            "or build a new database"
        )


def _read_and_render(store, paths, renderer, skipped, format, source, source_column, on_error):
    known = {row[0] for row in store.query("SELECT sample_id FROM samples").fetchall()}
    seen: dict[str, str] = {}
    pending: list[_Pending] = []
    n_duplicates = 0
    records = read_corpus(paths, format=format, source=source, source_column=source_column,
                          on_error=on_error, skipped=skipped)
    for sample in records:
        where = f"{sample.path}:{sample.line}"
        sample_id = sample.sample_id
        if sample_id in known or sample_id in seen:
            first = "an earlier run" if sample_id in known else seen[sample_id]
            skipped.append(SkippedRecord(sample.path, sample.line, None, f"duplicate of sample {sample_id} ({first})"))
            n_duplicates += 1
            continue
        try:
            rendered = renderer.render(sample.messages)
        except RenderError as error:
            if on_error == "stop":
                raise InputError(sample.path, sample.line, None, str(error),
                                 "fix the record, or pass --on-error skip to skip it") from error
            skipped.append(SkippedRecord(sample.path, sample.line, None, str(error)))
            continue
        seen[sample_id] = where
        pending.append(_Pending(sample, rendered))
    return pending, n_duplicates


def _forward(loaded: LoadedModel, pending: list[_Pending], settings: IndexSettings, progress: bool) -> list[dict]:
    """Return, per pending sample, its in-scope token rows and unit vectors."""
    loaded.use_attention("eager" if settings.store_saliency else "sdpa")
    sequences = [p.rendered.input_ids for p in pending]
    rows: list[dict | None] = [None] * len(pending)
    total = sum(len(s) for s in sequences)
    log.info("forward passes over %d samples, %d tokens, batches of at most %d padded tokens, %s attention",
             len(pending), total, settings.batch_tokens, "eager" if settings.store_saliency else "sdpa")
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="index", disable=not progress, dynamic_ncols=True)
    done = {"samples": 0}

    def on_batch(n_samples: int, n_tokens: int) -> None:
        done["samples"] += n_samples
        bar.update(n_tokens)
        bar.set_postfix(samples=f"{done['samples']}/{len(pending)}", refresh=False)

    saliency = settings.saliency if settings.store_saliency else None
    try:
        for index, states in encode(loaded.model, sequences, batch_tokens=settings.batch_tokens,
                                    pad_id=loaded.pad_id, saliency=saliency, on_batch=on_batch):
            rows[index] = _content_rows(pending[index].rendered, states, settings)
    finally:
        bar.close()
    return rows


def _content_rows(rendered: RenderedSample, states, settings: IndexSettings) -> dict:
    parts = np.asarray(rendered.parts, dtype=np.int8)
    in_scope = parts != TEMPLATE
    positions = np.flatnonzero(in_scope)
    saliency = None
    if states.row is not None:
        saliency = blend_saliency(states.row, states.column, in_scope, settings.saliency)[positions]
    return {
        "keys": positions,  # replaced by token keys at write time
        "classes": np.asarray(rendered.input_ids, dtype=np.int32)[positions],
        "parts": parts[positions],
        "saliency": saliency,
        "vectors": states.hidden[positions],
    }


def _write(store, identity, settings, pending, rows, summary, arguments, started) -> int:
    """Write the segment file, then every row of the run in one transaction."""
    first_sample_key = store.next_id("samples", "sample_key")
    first_token_key = store.next_id("tokens", "token_key")
    segment_id = store.next_id("segments", "segment_id")
    counts = np.array([len(r["keys"]) for r in rows], dtype=np.int64)
    token_keys = first_token_key + np.arange(int(counts.sum()), dtype=np.int64)
    dim = int(identity["hidden_size"])
    vectors = np.concatenate([r["vectors"] for r in rows]) if rows else np.zeros((0, dim), np.float32)
    file_name, file_bytes = (None, 0)
    if len(token_keys):
        file_name, file_bytes = store.write_segment(segment_id, vectors, token_keys)
    try:
        with store.transaction() as connection:
            run_id = store.start_run(connection, "index", arguments, settings.to_dict())
            if not store.catalog():
                _write_catalog(connection, identity, settings)
            source_ids = _write_sources(store, connection, pending, run_id)
            _write_samples(store, connection, pending, rows, source_ids, run_id, first_sample_key)
            _write_tokens(store, connection, rows, counts, token_keys, first_sample_key)
            if file_name:
                connection.execute(
                    "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [segment_id, run_id, file_name, len(token_keys), int(token_keys[0]), int(token_keys[-1]),
                     dim, SEGMENT_CODEC, file_bytes],
                )
            _write_skipped(connection, summary.skipped, run_id)
            stats = summary.to_dict() | {"seconds": round(time.perf_counter() - started, 3)}
            store.finish_run(connection, run_id, stats)
    except BaseException:
        if file_name:
            (store.vectors_dir / file_name).unlink(missing_ok=True)
        raise
    return run_id


def _write_catalog(connection, identity: dict, settings: IndexSettings) -> None:
    for key, value in (("model", identity), ("index_settings", settings.to_dict())):
        connection.execute("INSERT INTO catalog VALUES (?, ?)", [key, json.dumps(value)])


def _write_sources(store, connection, pending, run_id) -> dict[str, int]:
    source_ids = dict(store.query("SELECT name, source_id FROM sources").fetchall())
    next_id = store.next_id("sources", "source_id")
    for name in dict.fromkeys(p.sample.source for p in pending):
        if name not in source_ids:
            connection.execute("INSERT INTO sources VALUES (?, ?, ?)", [next_id, name, run_id])
            source_ids[name] = next_id
            next_id += 1
    return source_ids


def _write_samples(store, connection, pending, rows, source_ids, run_id, first_key) -> None:
    if not pending:
        return
    table = pa.table({
        "sample_key": pa.array(first_key + np.arange(len(pending)), pa.int64()),
        "sample_id": [p.sample.sample_id for p in pending],
        "source_id": pa.array([source_ids[p.sample.source] for p in pending], pa.int32()),
        "run_id": pa.array([run_id] * len(pending), pa.int32()),
        "path": [str(p.sample.path) for p in pending],
        "line": pa.array([p.sample.line for p in pending], pa.int32()),
        "n_turns": pa.array([len(p.sample.messages) for p in pending], pa.int32()),
        "n_tokens": pa.array([len(r["keys"]) for r in rows], pa.int32()),
        "n_prompt_tokens": pa.array([int((r["parts"] == PROMPT).sum()) for r in rows], pa.int32()),
        "n_response_tokens": pa.array([int((r["parts"] == RESPONSE).sum()) for r in rows], pa.int32()),
        "truncated": [bool(p.rendered.truncated) for p in pending],
        "record": [json.dumps(p.sample.record, ensure_ascii=False, default=str) for p in pending],
        "text_hash": [normalized_text_hash(p.sample.messages) for p in pending],
    })
    store.insert_arrow(connection, "samples", table)


def _write_tokens(store, connection, rows, counts, token_keys, first_sample_key) -> None:
    if not len(token_keys):
        return
    has_saliency = rows[0]["saliency"] is not None
    table = pa.table({
        "token_key": token_keys,
        "sample_key": np.repeat(first_sample_key + np.arange(len(rows), dtype=np.int64), counts),
        "position": np.concatenate([r["keys"] for r in rows]).astype(np.int32),
        "token_class": np.concatenate([r["classes"] for r in rows]),
        "part": np.concatenate([r["parts"] for r in rows]),
        "saliency": (np.concatenate([r["saliency"] for r in rows]).astype(np.float32) if has_saliency
                     else pa.nulls(len(token_keys), pa.float32())),
    })
    store.insert_arrow(connection, "tokens", table)


def _write_skipped(connection, skipped: list[SkippedRecord], run_id: int) -> None:
    for record in skipped:
        connection.execute(
            "INSERT INTO skipped VALUES (?, ?, ?, ?, ?)",
            [run_id, str(record.path), record.line, record.field, record.reason],
        )


def check_index_ready(store: Store) -> dict:
    """Return the catalog of an index that has samples, or raise StorageError."""
    catalog = store.catalog()
    if "model" not in catalog:
        raise StorageError(f"{store.path} has no indexed samples yet; run `trimdb index CORPUS --db {store.path}` first")
    return catalog
