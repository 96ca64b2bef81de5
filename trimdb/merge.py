"""`trimdb merge`: copy the samples of indexes built elsewhere into one index.

Shards of a pool can be indexed on several machines with the same model and settings, then
merged. Each source segment becomes one new segment of the target: samples the target already
contains (same sample id) are dropped, the remaining token vectors keep their stored codes
(FAISS removes the dropped ids without re-encoding), and the tokens get new consecutive keys.
Like indexing, each segment is committed on its own, so an interrupted merge resumes when rerun.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from trimdb.errors import SettingsError, StorageError
from trimdb.models import check_identity
from trimdb.settings import IndexSettings
from trimdb.store import Store, _write_index_atomically

log = logging.getLogger(__name__)

SETTING_KEYS = ("max_length", "store_saliency", "saliency", "plain_template")


@dataclass
class MergeSummary:
    """Samples and tokens copied from one source index, and samples skipped as already present."""

    n_samples: int = 0
    n_tokens: int = 0
    n_already_present: int = 0
    n_segments: int = 0


def merge_index(target_path: str | Path, source_path: str | Path) -> MergeSummary:
    """Copy every sample of the index at ``source_path`` that ``target_path`` lacks."""
    if Path(target_path).resolve() == Path(source_path).resolve():
        raise SettingsError(f"cannot merge {source_path} into itself")
    summary = MergeSummary()
    with Store(source_path, read_only=True) as source, Store(target_path, create=True) as target:
        source_catalog = source.catalog()
        if "model" not in source_catalog:
            raise StorageError(f"{source.path} has no indexed samples to merge")
        run_id = _check_compatible(target, source_catalog, source.path)
        target.remove_orphan_segments()
        for segment in source.segments():
            _merge_segment(target, source, segment, run_id, source_catalog, summary)
        with target.transaction() as connection:
            _ensure_run(target, connection, run_id, source_catalog, source.path)
            target.finish_run(connection, run_id, summary.__dict__)
    log.info("merged %d samples (%d tokens) from %s; %d were already present",
             summary.n_samples, summary.n_tokens, source_path, summary.n_already_present)
    return summary


def _check_compatible(target: Store, source_catalog: dict, source_path: Path) -> int:
    catalog = target.catalog()
    if "model" in catalog:
        check_identity(catalog["model"], source_catalog["model"])
        stored = IndexSettings.from_dict(catalog["index_settings"]).to_dict()
        incoming = IndexSettings.from_dict(source_catalog["index_settings"]).to_dict()
        differences = [key for key in SETTING_KEYS if stored[key] != incoming[key]]
        if differences:
            raise SettingsError(
                f"{source_path} was indexed with other settings than {target.path} ({', '.join(differences)}); "
                "only indexes built with the same settings can be merged"
            )
    return target.next_id("runs", "run_id")


def _ensure_run(target: Store, connection, run_id: int, source_catalog: dict, source_path: Path) -> None:
    if connection.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchall():
        return
    target.insert_run(connection, run_id, "merge", {"source": str(source_path)}, source_catalog["index_settings"])
    if not connection.execute("SELECT 1 FROM catalog WHERE key = 'model'").fetchall():
        for key in ("model", "index_settings"):
            connection.execute("INSERT INTO catalog VALUES (?, ?)", [key, json.dumps(source_catalog[key])])


def _merge_segment(target: Store, source: Store, segment, run_id: int, source_catalog: dict,
                   summary: MergeSummary) -> None:
    first, last = source.query("SELECT first_token_key, last_token_key FROM segments WHERE segment_id = ?",
                               [segment.segment_id]).fetchall()[0]
    samples = source.query_arrow(
        "SELECT s.*, src.name AS source_name FROM samples s JOIN sources src USING (source_id) "
        "WHERE sample_key IN (SELECT DISTINCT sample_key FROM tokens WHERE token_key BETWEEN ? AND ?) "
        "ORDER BY sample_key", [first, last])
    present = {row[0] for row in target.query("SELECT sample_id FROM samples").fetchall()}
    keep = np.array([sample_id not in present for sample_id in samples["sample_id"].to_pylist()], dtype=bool)
    summary.n_already_present += int((~keep).sum())
    if not keep.any():
        return
    samples = samples.filter(pa.array(keep))
    tokens = source.query_arrow(
        "SELECT * FROM tokens WHERE token_key BETWEEN ? AND ? ORDER BY token_key", [first, last])
    kept_keys = set(samples["sample_key"].to_pylist())
    token_keep = np.isin(tokens["sample_key"].to_numpy(), np.fromiter(kept_keys, dtype=np.int64))
    tokens = tokens.filter(pa.array(token_keep))

    index = faiss.read_index(str(source.vectors_dir / segment.file))
    dropped = np.asarray(faiss.vector_to_array(index.id_map), dtype=np.int64)[~token_keep]
    if len(dropped):
        index.remove_ids(faiss.IDSelectorArray(len(dropped), faiss.swig_ptr(dropped)))
    _commit(target, index, samples, tokens, segment, run_id, source_catalog, source.path)
    summary.n_samples += len(samples)
    summary.n_tokens += len(tokens)
    summary.n_segments += 1


def _commit(target: Store, index, samples: pa.Table, tokens: pa.Table, segment, run_id, source_catalog,
            source_path) -> None:
    """Re-key the kept samples and tokens, write the segment file, then commit its rows."""
    first_sample = target.next_id("samples", "sample_key")
    first_token = target.next_id("tokens", "token_key")
    segment_id = target.next_id("segments", "segment_id")
    sample_map = {old: first_sample + i for i, old in enumerate(samples["sample_key"].to_pylist())}
    new_token_keys = first_token + np.arange(len(tokens), dtype=np.int64)
    faiss.copy_array_to_vector(new_token_keys, index.id_map)
    index.construct_rev_map()
    target.vectors_dir.mkdir(exist_ok=True)
    name = f"segment-{segment_id:06d}.faiss"
    _write_index_atomically(index, target.vectors_dir / name)
    try:
        with target.transaction() as connection:
            _ensure_run(target, connection, run_id, source_catalog, source_path)
            source_ids = _source_ids(connection, samples["source_name"].to_pylist(), run_id)
            samples = samples.set_column(samples.schema.get_field_index("sample_key"), "sample_key",
                                         pa.array([sample_map[k] for k in samples["sample_key"].to_pylist()], pa.int64()))
            samples = samples.set_column(samples.schema.get_field_index("source_id"), "source_id",
                                         pa.array([source_ids[n] for n in samples["source_name"].to_pylist()], pa.int32()))
            samples = samples.set_column(samples.schema.get_field_index("run_id"), "run_id",
                                         pa.array([run_id] * len(samples), pa.int32()))
            target.insert_arrow(connection, "samples", samples.drop(["source_name"]))
            tokens = tokens.set_column(0, "token_key", pa.array(new_token_keys, pa.int64()))
            tokens = tokens.set_column(1, "sample_key",
                                       pa.array([sample_map[k] for k in tokens["sample_key"].to_pylist()], pa.int64()))
            target.insert_arrow(connection, "tokens", tokens)
            connection.execute(
                "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [segment_id, run_id, name, len(tokens), int(new_token_keys[0]), int(new_token_keys[-1]),
                 segment.dim, source_catalog["index_settings"].get("codec", "float32"),
                 (target.vectors_dir / name).stat().st_size],
            )
    except BaseException:
        (target.vectors_dir / name).unlink(missing_ok=True)
        raise


def _source_ids(connection, names: list[str], run_id: int) -> dict[str, int]:
    source_ids = dict(connection.execute("SELECT name, source_id FROM sources").fetchall())
    next_id = max(source_ids.values(), default=0) + 1
    for name in dict.fromkeys(names):
        if name not in source_ids:
            connection.execute("INSERT INTO sources VALUES (?, ?, ?)", [next_id, name, run_id])
            source_ids[name] = next_id
            next_id += 1
    return source_ids
