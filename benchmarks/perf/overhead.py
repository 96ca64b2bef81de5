"""Index overhead: `trimdb index` against the bare forward pass over the same token sequences.

The bare forward pass is the least work any forward-pass selector must do: the model's decoder
over the rendered samples, in the batches that trimdb.forward.plan_batches forms, with SDPA
attention, no hooks, and nothing kept or stored. It runs over the same segments as the index
run (a segment closes once its content tokens reach the vector budget of DEFAULT_SEGMENT_MB),
so both sides form the same batches.

`index_corpus` loads its own model. Its model-load time is measured inside each run, by timing
the call of trimdb.indexing.load_model, and subtracted. Everything else counts as indexing:
reading and rendering the corpus twice (plan and stream), forward passes, saliency, and writing
vectors and rows.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import trimdb.indexing
from trimdb.forward import plan_batches
from trimdb.indexing import DEFAULT_SEGMENT_MB, index_corpus
from trimdb.models import LoadedModel, load_model
from trimdb.records import read_corpus
from trimdb.render import TEMPLATE, Renderer
from trimdb.settings import IndexSettings, SaliencySettings
from benchmarks.perf.timing import record_calls

log = logging.getLogger(__name__)


@dataclass
class RenderedPool:
    """The pool as the index run reads it: token sequences grouped into the index's segments."""

    segments: list[list[list[int]]]
    n_samples: int
    n_forward_tokens: int
    n_content_tokens: int
    render_seconds: float


@dataclass
class IndexTiming:
    """One index_corpus run: wall time, its model-load time, and what it stored."""

    label: str
    wall_seconds: float
    load_seconds: float
    n_tokens: int
    bytes_on_disk: int

    @property
    def seconds(self) -> float:
        return self.wall_seconds - self.load_seconds


@dataclass
class OverheadResult:
    """Bare forward times (one per repetition), index runs, and the pool's size."""

    pool: RenderedPool
    model_load_seconds: float
    forward_seconds: list[float] = field(default_factory=list)
    index_runs: list[IndexTiming] = field(default_factory=list)
    device: str = "cpu"

    @property
    def forward_best(self) -> float:
        return min(self.forward_seconds)

    def ratio(self, run: IndexTiming) -> float:
        return run.seconds / self.forward_best


def render_pool(loaded: LoadedModel, pool: Path, settings: IndexSettings, source_column: str | None) -> RenderedPool:
    """Render the pool once, drop repeated samples as indexing does, and split it into the index's segments."""
    renderer = Renderer(loaded.tokenizer, max_length=settings.max_length,
                        plain_template=settings.plain_template or None)
    segment_tokens = max(1, int(DEFAULT_SEGMENT_MB * 1e6 // (4 * int(loaded.model.config.hidden_size))))
    started = time.perf_counter()
    seen: set[str] = set()
    segments: list[list[list[int]]] = [[]]
    segment_content = n_content = n_forward = 0
    for sample in read_corpus([pool], source_column=source_column):
        if sample.sample_id in seen:
            continue
        seen.add(sample.sample_id)
        rendered = renderer.render(sample.messages)
        content = sum(1 for part in rendered.parts if part != TEMPLATE)
        segments[-1].append(rendered.input_ids)
        segment_content += content
        n_content, n_forward = n_content + content, n_forward + len(rendered.input_ids)
        if segment_content >= segment_tokens:
            segments.append([])
            segment_content = 0
    seconds = time.perf_counter() - started
    return RenderedPool([segment for segment in segments if segment], len(seen), n_forward, n_content, seconds)


def bare_forward(loaded: LoadedModel, pool: RenderedPool, batch_tokens: int) -> float:
    """Return the seconds of the decoder's forward passes over the pool, SDPA attention, nothing kept."""
    loaded.use_attention("sdpa")
    decoder = loaded.model.get_decoder()
    device = next(loaded.model.parameters()).device
    started = time.perf_counter()
    for sequences in pool.segments:
        for batch in plan_batches([len(s) for s in sequences], batch_tokens):
            input_ids, attention_mask = _padded_batch([sequences[i] for i in batch], loaded.pad_id)
            with torch.inference_mode():
                decoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _padded_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad sequences into input ids (B, T) and an attention mask (B, T), as trimdb.forward does."""
    lengths = torch.tensor([len(s) for s in sequences])
    width = int(lengths.max())
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return input_ids, attention_mask


def timed_index(label: str, db_path: Path, pool: Path, settings: IndexSettings, source_column: str | None,
                model: str | None) -> IndexTiming:
    """Run index_corpus into a new database and return its time without the model load."""
    remove_database(db_path)
    loads: list[float] = []
    started = time.perf_counter()
    with record_calls(trimdb.indexing, "load_model", loads):
        summary = index_corpus(db_path, [pool], model=model, settings=settings, source_column=source_column,
                               progress=False)
    wall = time.perf_counter() - started
    log.info("index run %s: %.1f s (model load %.1f s), %d tokens", label, wall, sum(loads), summary.n_tokens)
    return IndexTiming(label, wall, sum(loads), summary.n_tokens, summary.bytes_on_disk)


def measure_overhead(pool: Path, work: Path, *, dtype: str, model: str | None = None,
                     source_column: str | None = "source",
                     saliency: SaliencySettings = SaliencySettings()) -> tuple[OverheadResult, Path]:
    """Time the bare forward pass, then index with and without saliency, interleaved.

    Return the result and the database indexed with default settings (saliency stored), which
    later sections query. The order is forward, index (saliency), forward, index (no saliency).
    The lower forward time is the reference, so a slow moment in one repetition does not inflate
    the ratio.
    """
    settings = IndexSettings(dtype=dtype, saliency=saliency, codec="float32")
    started = time.perf_counter()
    loaded = load_model(model, dtype=dtype)
    load_seconds = time.perf_counter() - started
    rendered = render_pool(loaded, pool, settings, source_column)
    log.info("pool: %d samples, %d forward tokens in %d segments", rendered.n_samples, rendered.n_forward_tokens,
             len(rendered.segments))
    result = OverheadResult(rendered, load_seconds, device=str(next(loaded.model.parameters()).device))
    saliency_db = work / "index-saliency.duckdb"
    plain_db = work / "index-no-saliency.duckdb"

    result.forward_seconds.append(bare_forward(loaded, rendered, settings.batch_tokens))
    default_run = timed_index("saliency stored (default)", saliency_db, pool, settings, source_column, model)
    result.index_runs.append(default_run)
    result.forward_seconds.append(bare_forward(loaded, rendered, settings.batch_tokens))
    no_saliency = IndexSettings(dtype=dtype, saliency=saliency, store_saliency=False, codec="float32")
    result.index_runs.append(timed_index("no saliency", plain_db, pool, no_saliency, source_column, model))
    remove_database(plain_db)
    return result, saliency_db


def remove_database(db_path: Path) -> None:
    """Delete a trimdb database, its write-ahead log and its vector folder, where they exist."""
    for leftover in (db_path, Path(f"{db_path}.wal")):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(Path(f"{db_path}.vectors"), ignore_errors=True)
