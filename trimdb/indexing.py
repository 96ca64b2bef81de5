"""`trimdb index`: forward passes over a corpus once, storing every content token's state.

Stages, in order:
1. plan: read and render every record, so input errors surface before any forward pass, count
   the tokens, and check that the disk can hold them;
2. stream the corpus again in segments of about ``segment_mb`` of vectors: render, skip samples
   already indexed or repeated, run batched forward passes (eager attention on the last L layers
   when saliency is stored), then commit the segment (trimdb.segments);
3. record the skipped records and the run's counts.

Each committed segment survives a crash. Rerunning the same command resumes: samples already
in the index are counted and skipped, so nothing is duplicated or missing. Only prompt and
response content tokens are stored; template scaffolding and special tokens are identical across
samples and never in scope.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from trimdb.codecs import AUTO, bytes_per_vector, resolve_codec
from trimdb.errors import InputError, RenderError, SettingsError, StorageError
from trimdb.forward import attention_modules, encode
from trimdb.models import check_identity, load_model
from trimdb.records import SkippedRecord, read_corpus
from trimdb.render import TEMPLATE, RenderedSample, Renderer
from trimdb.saliency import blend_saliency
from trimdb.settings import IndexSettings
from trimdb.segments import PendingSample, commit_segment, finish_index_run
from trimdb.store import Store, check_database_file

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
    n_already_indexed: int = 0
    n_segments: int = 0
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
            "n_already_indexed": self.n_already_indexed, "n_segments": self.n_segments,
            "bytes_on_disk": self.bytes_on_disk, "seconds": round(self.seconds, 3),
        }


# Vectors per segment are bounded by bytes, so segment memory does not grow with the hidden size.
DEFAULT_SEGMENT_MB = 256
# Free space kept beyond the estimate, for DuckDB's write-ahead log and metadata growth.
DISK_MARGIN = 1.1
# DuckDB bytes per stored token row, measured on the demo pool (an estimate).
TOKEN_ROW_BYTES = 25


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
    append: bool = False,
    segment_mb: float = DEFAULT_SEGMENT_MB,
    adapter: str | Path | None = None,
) -> IndexSummary:
    """Index the records of ``paths`` into the database at ``db_path`` (created unless ``append``)."""
    settings.validate()
    if not paths:
        raise SettingsError("no corpus files given; pass at least one JSONL, JSON or Parquet file or a folder")
    if segment_mb <= 0:
        raise SettingsError(f"segment size must be positive, got {segment_mb} MB")
    created = not Path(db_path).exists()
    if append and created:
        raise StorageError(f"--append needs an existing index, but {db_path} does not exist; drop --append to create it")
    check_database_file(Path(db_path))  # before the model loads
    started = time.perf_counter()
    loaded = load_model(model, dtype=settings.dtype, adapter=adapter)
    if settings.store_saliency:
        attention_modules(loaded.model, settings.saliency.layers)  # checks --layers before the database opens
    renderer = Renderer(loaded.tokenizer, max_length=settings.max_length, plain_template=settings.plain_template or None)
    identity = loaded.identity(renderer.template_sha256)
    segment_tokens = max(1, int(segment_mb * 1e6 // (4 * int(identity["hidden_size"]))))
    reader = _Reader(paths, renderer, format, source, source_column, on_error)

    try:
        with Store(db_path, create=True) as store:
            stored = store.catalog().get("index_settings")
            if settings.codec == AUTO and stored is not None:
                settings = dataclasses.replace(settings, codec=IndexSettings.from_dict(stored).codec)
            _check_catalog(store, identity, settings)
            store.remove_orphan_segments()
            summary = _plan(store, reader)
            settings = dataclasses.replace(settings, codec=resolve_codec(settings.codec,
                                                                         min(summary.n_tokens, segment_tokens)))
            _check_disk(store, summary.n_tokens, settings, int(identity["hidden_size"]))
            run = {"run_id": store.next_id("runs", "run_id"), "arguments": arguments or {},
                   "settings": settings.to_dict(), "identity": identity}
            _stream(store, reader, loaded, settings, summary, run, segment_tokens, progress)
            summary.run_id = run["run_id"]
            summary.seconds = time.perf_counter() - started
            summary.bytes_on_disk = store.size_bytes()
            finish_index_run(store, run, summary.skipped, summary.to_dict())
    except BaseException:
        if created and not _has_segments(Path(db_path)):
            _remove_database(Path(db_path))
        raise
    return summary


class _Reader:
    """Reads and renders the corpus; each call of ``samples`` starts from the first record."""

    def __init__(self, paths, renderer, format, source, source_column, on_error):
        self.paths, self.renderer, self.on_error = list(paths), renderer, on_error
        self.options = {"format": format, "source": source, "source_column": source_column}

    def samples(self, skipped: list[SkippedRecord]):
        """Yield (sample, rendered) for every readable record; bad records go to ``skipped`` or raise."""
        for sample in read_corpus(self.paths, on_error=self.on_error, skipped=skipped, **self.options):
            try:
                rendered = self.renderer.render(sample.messages)
            except RenderError as error:
                if self.on_error == "stop":
                    raise InputError(sample.path, sample.line, None, str(error),
                                     "fix the record, or pass --on-error skip to skip it") from error
                skipped.append(SkippedRecord(sample.path, sample.line, None, str(error)))
                continue
            yield sample, rendered


def _plan(store: Store, reader: _Reader) -> IndexSummary:
    """Validate every record and count the work before any forward pass."""
    known = _known_sample_ids(store)
    seen: dict[str, str] = {}
    skipped: list[SkippedRecord] = []
    summary = IndexSummary(run_id=None, n_samples=0, n_tokens=0, n_truncated=0, skipped=skipped)
    for sample, rendered in reader.samples(skipped):
        sample_id = sample.sample_id
        if sample_id in known:
            summary.n_already_indexed += 1
            continue
        if sample_id in seen:
            skipped.append(SkippedRecord(sample.path, sample.line, None,
                                         f"duplicate of sample {sample_id} ({seen[sample_id]})"))
            summary.n_duplicates += 1
            continue
        seen[sample_id] = f"{sample.path}:{sample.line}"
        summary.n_samples += 1
        summary.n_forward_tokens += len(rendered.input_ids)
        summary.n_tokens += sum(1 for part in rendered.parts if part != TEMPLATE)
        summary.n_truncated += rendered.truncated
    log.info("%d new samples (%d tokens, %d content tokens), %d already indexed, %d skipped (%d duplicates)",
             summary.n_samples, summary.n_forward_tokens, summary.n_tokens, summary.n_already_indexed,
             len(skipped), summary.n_duplicates)
    return summary


def _known_sample_ids(store: Store) -> set[str]:
    return {row[0] for row in store.query("SELECT sample_id FROM samples").fetchall()}


def _check_disk(store: Store, n_tokens: int, settings: IndexSettings, dim: int) -> None:
    per_token = bytes_per_vector(settings.codec, dim) + TOKEN_ROW_BYTES
    needed = int(n_tokens * per_token * DISK_MARGIN)
    free = shutil.disk_usage(store.path.parent).free
    log.info("estimated disk use: %.1f MB (%d tokens x %d bytes, %s codec); %.1f GB free",
             needed / 1e6, n_tokens, per_token, settings.codec, free / 1e9)
    if needed > free:
        raise StorageError(
            f"not enough disk space in {store.path.parent}: the index needs about {needed / 1e9:.2f} GB "
            f"({n_tokens} tokens x {per_token} bytes) but {free / 1e9:.2f} GB are free; free space, or pick "
            "a smaller --codec"
        )


def _stream(store, reader, loaded, settings, summary, run, segment_tokens, progress) -> None:
    """Forward and commit the new samples segment by segment."""
    loaded.use_attention("eager" if settings.store_saliency else "sdpa")
    log.info("forward passes over %d samples, %d tokens, batches of at most %d padded tokens, %s attention",
             summary.n_samples, summary.n_forward_tokens, settings.batch_tokens,
             "eager" if settings.store_saliency else "sdpa")
    bar = tqdm(total=summary.n_forward_tokens, unit="tok", unit_scale=True, desc="index", disable=not progress,
               dynamic_ncols=True)
    known = _known_sample_ids(store)
    done = {"samples": 0}
    pending: list[PendingSample] = []
    content_tokens = 0
    try:
        for sample, rendered in reader.samples([]):
            if sample.sample_id in known:
                continue
            known.add(sample.sample_id)
            pending.append(PendingSample(sample, rendered))
            content_tokens += sum(1 for part in rendered.parts if part != TEMPLATE)
            if content_tokens >= segment_tokens:
                _flush(store, loaded, settings, pending, run, summary, bar, done)
                pending, content_tokens = [], 0
        if pending:
            _flush(store, loaded, settings, pending, run, summary, bar, done)
    finally:
        bar.close()


def _flush(store, loaded, settings, pending, run, summary, bar, done) -> None:
    def on_batch(n_samples: int, n_tokens: int) -> None:
        done["samples"] += n_samples
        bar.update(n_tokens)
        bar.set_postfix(samples=f"{done['samples']}/{summary.n_samples}", refresh=False)

    saliency = settings.saliency if settings.store_saliency else None
    sequences = [p.rendered.input_ids for p in pending]
    for index, states in encode(loaded.model, sequences, batch_tokens=settings.batch_tokens,
                                pad_id=loaded.pad_id, saliency=saliency, on_batch=on_batch):
        pending[index].rows = _content_rows(pending[index].rendered, states, settings)
    commit_segment(store, pending, run, settings.codec)
    summary.n_segments += 1
    log.debug("committed segment %d with %d samples", summary.n_segments, len(pending))


def _has_segments(path: Path) -> bool:
    vectors = Path(f"{path}.vectors")
    return vectors.is_dir() and any(p.name.startswith("segment-") for p in vectors.iterdir())


def _remove_database(path: Path) -> None:
    """Delete a database that a failed run created before committing anything."""
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
    stored = IndexSettings.from_dict(catalog["index_settings"]).to_dict()
    current = settings.to_dict()
    keys = ("max_length", "store_saliency", "saliency", "plain_template", "codec")
    differences = [key for key in keys if stored.get(key) != current.get(key)]
    if differences:
        details = "; ".join(f"{key}: index {stored.get(key)!r}, now {current.get(key)!r}" for key in differences)
        raise SettingsError(
            f"{store.path} was built with other index settings ({details}); rerun with the index's settings "
            "or build a new database"
        )


def _content_rows(rendered: RenderedSample, states, settings: IndexSettings) -> dict:
    parts = np.asarray(rendered.parts, dtype=np.int8)
    in_scope = parts != TEMPLATE
    positions = np.flatnonzero(in_scope)
    saliency = None
    if states.row is not None:
        saliency = blend_saliency(states.row, states.column, in_scope, settings.saliency)[positions]
    return {
        "positions": positions,
        "classes": np.asarray(rendered.input_ids, dtype=np.int32)[positions],
        "parts": parts[positions],
        "saliency": saliency,
        "vectors": states.hidden[positions],
    }


def check_index_ready(store: Store) -> dict:
    """Return the catalog of an index that has samples, or raise StorageError."""
    catalog = store.catalog()
    if "model" not in catalog:
        raise StorageError(f"{store.path} has no indexed samples yet; run `trimdb index CORPUS --db {store.path}` first")
    return catalog
