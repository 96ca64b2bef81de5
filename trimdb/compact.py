"""`trimdb compact`: merge runs of small adjacent vector segments into larger ones.

Many small segments (from appends or small --segment-mb) cost a file open each during a query.
Compaction merges adjacent segments whose token keys are consecutive, without decoding: FAISS
merges the stored codes, so trained codecs lose nothing. The merged file is written first, and
the segment rows are swapped in one transaction. The old files are deleted after the commit, so
a crash in between leaves only unreferenced files, which the next writing run deletes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import faiss

from trimdb.errors import SettingsError
from trimdb.store import Store, _write_index_atomically

log = logging.getLogger(__name__)


@dataclass
class CompactSummary:
    """Segments before and after compaction."""

    segments_before: int
    segments_after: int
    bytes_before: int
    bytes_after: int


def compact_index(db_path: str | Path, target_mb: float = 1024) -> CompactSummary:
    """Merge adjacent segments into segments of at most about ``target_mb`` megabytes each."""
    if target_mb <= 0:
        raise SettingsError(f"target segment size must be positive, got {target_mb} MB")
    with Store(db_path) as store:
        store.remove_orphan_segments()
        rows = store.query(
            "SELECT segment_id, file, n_vectors, first_token_key, last_token_key, dim, codec, bytes, run_id "
            "FROM segments ORDER BY first_token_key").fetchall()
        groups = _plan_groups(rows, target_mb * 1e6)
        before = (len(rows), sum(row[7] for row in rows))
        for group in groups:
            if len(group) > 1:
                _merge(store, group)
        after = store.query("SELECT count(*), coalesce(sum(bytes), 0) FROM segments").fetchall()[0]
    summary = CompactSummary(before[0], int(after[0]), before[1], int(after[1]))
    log.info("compacted %d segments into %d", summary.segments_before, summary.segments_after)
    return summary


def _plan_groups(rows, target_bytes: float) -> list[list[tuple]]:
    """Group consecutive segments whose keys continue each other, up to ``target_bytes`` per group."""
    groups: list[list[tuple]] = []
    for row in rows:
        current = groups[-1] if groups else None
        fits = current is not None and sum(r[7] for r in current) + row[7] <= target_bytes
        continues = current is not None and current[-1][4] + 1 == row[3] and current[-1][6] == row[6]
        if fits and continues:
            current.append(row)
        else:
            groups.append([row])
    return groups


def _merge(store: Store, group: list[tuple]) -> None:
    merged = faiss.read_index(str(store.vectors_dir / group[0][1]))
    for row in group[1:]:
        merged.merge_from(faiss.read_index(str(store.vectors_dir / row[1])))
    segment_id = store.next_id("segments", "segment_id")
    name = f"segment-{segment_id:06d}.faiss"
    _write_index_atomically(merged, store.vectors_dir / name)
    size = (store.vectors_dir / name).stat().st_size
    first, last = group[0], group[-1]
    with store.transaction() as connection:
        connection.execute(
            f"DELETE FROM segments WHERE segment_id IN ({', '.join('?' * len(group))})", [row[0] for row in group])
        connection.execute(
            "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [segment_id, last[8], name, sum(row[2] for row in group), first[3], last[4], first[5], first[6], size],
        )
    for row in group:
        (store.vectors_dir / row[1]).unlink(missing_ok=True)
    store._segment_ranges = None
