"""Scale curve: query time and peak memory on synthetic stores of growing size.

One store grows in place through the sizes, smallest first, so the largest size costs only its
own vectors. After each size a fresh Python process (benchmarks.perf.query_child) runs one
`trimdb query`, so its peak memory is that query's alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trimdb.ann import build_ann
from benchmarks.perf.synthetic import SyntheticSpec, grow_store

log = logging.getLogger(__name__)

REPOSITORY = Path(__file__).resolve().parents[2]


@dataclass
class ScalePoint:
    """One store size: vectors, disk use, build time of the vectors added for it, the child query's report."""

    n_vectors: int
    disk_bytes: int
    build_seconds: float
    query: dict
    new_vectors: int = 0
    # The approximate path at this size: build_ann's summary and the approximate child query.
    ann: dict | None = None

    @property
    def scan_tokens_per_second(self) -> float:
        return self.n_vectors / self.query["scan_seconds"]


def parse_size(text: str) -> int:
    """Parse a vector count such as 200k, 1M, 1.5M or 20000000."""
    raw = text.strip().lower().replace("_", "")
    factor = {"k": 1_000, "m": 1_000_000}.get(raw[-1:], 1)
    number = raw[:-1] if factor > 1 else raw
    try:
        value = float(number) * factor
    except ValueError:
        raise ValueError(f"invalid size {text!r}: give a vector count such as 200k, 1M or 20000000") from None
    if value < 1:
        raise ValueError(f"invalid size {text!r}: a store needs at least one vector")
    return int(value)


def folder_bytes(db_path: Path) -> int:
    """Return the bytes of a database file, its write-ahead log and its vector folder."""
    total = sum(path.stat().st_size for path in (db_path, Path(f"{db_path}.wal")) if path.exists())
    vectors = Path(f"{db_path}.vectors")
    if vectors.is_dir():
        total += sum(path.stat().st_size for path in vectors.iterdir())
    return total


def child_env() -> dict[str, str]:
    """Return this process's environment with the repository first on PYTHONPATH, for benchmark children."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), env.get("PYTHONPATH")]))
    return env


def run_child_query(db_path: Path, task: str, target: Path, budget: str = "5%", candidates: str | None = None,
                    layers: int | None = None) -> dict:
    """Run one query in a fresh process and return the JSON report it prints."""
    command = [sys.executable, "-m", "benchmarks.perf.query_child", "--db", str(db_path),
               "--task", f"{task}={target}", "--budget", budget]
    if candidates is not None:
        command += ["--candidates", candidates]
    if layers is not None:
        command += ["--layers", str(layers)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY, env=child_env())
    if completed.returncode != 0:
        raise RuntimeError(f"query child failed with exit code {completed.returncode}: {completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure_scale(folder: Path, sizes: list[int], spec: SyntheticSpec, task: str, target: Path,
                  ann_sizes: int = 1, ann_largest: bool = True, layers: int | None = None,
                  deadline: float | None = None, notes: list[str] | None = None,
                  keep: bool = False) -> list[ScalePoint]:
    """Grow one synthetic store through ``sizes`` and query it after each; delete it unless ``keep``.

    At the ``ann_sizes`` smallest sizes, and at the largest size measured when ``ann_largest``, the
    sample-summary index is built too and an approximate query runs after the exact one. With ``deadline`` (a time.perf_counter() value), a size whose
    projected build and query time would end after it is skipped, with a line in ``notes``.
    """
    db_path = folder / "synthetic.duckdb"
    if db_path.exists() or Path(f"{db_path}.vectors").exists():
        raise FileExistsError(f"{db_path} already exists; remove it or pick another --work folder")
    points = []
    try:
        for size in sorted(sizes):
            if deadline is not None and points and _projected_end(points[-1], size) > deadline:
                (notes if notes is not None else []).append(
                    f"{size:,} vectors skipped: at the measured rates it would end after the time budget")
                continue
            started = time.perf_counter()
            grow_store(db_path, size, spec)
            build = time.perf_counter() - started
            report = run_child_query(db_path, task, target, layers=layers)
            added = size - (points[-1].n_vectors if points else 0)
            points.append(ScalePoint(size, folder_bytes(db_path), build, report, added))
            if len(points) <= ann_sizes:
                points[-1].ann = measure_ann_point(db_path, task, target, layers)
            log.info("scale %d vectors: build %.1f s, query %.1f s (scan %.1f s), peak RSS %.2f GB", size, build,
                     report["seconds"], report["scan_seconds"], report["peak_rss_bytes"] / 1e9)
        if ann_largest and points and points[-1].ann is None:
            points[-1].ann = measure_ann_point(db_path, task, target, layers)
    finally:
        if not keep:
            db_path.unlink(missing_ok=True)
            Path(f"{db_path}.wal").unlink(missing_ok=True)
            shutil.rmtree(Path(f"{db_path}.vectors"), ignore_errors=True)
    return points


def _projected_end(last: ScalePoint, size: int) -> float:
    """Return when growing to ``size`` and querying would end, at the rates measured for ``last``."""
    build = last.build_seconds / max(last.new_vectors, 1) * (size - last.n_vectors)
    query = last.query["seconds"] / last.n_vectors * size
    return time.perf_counter() + build + query


def measure_ann_point(db_path: Path, task: str, target: Path, layers: int | None = None) -> dict:
    """Build the sample-summary index and run one approximate query (candidates "auto") in a child."""
    summary = build_ann(db_path)
    report = run_child_query(db_path, task, target, candidates="auto", layers=layers)
    log.info("approximate path: build_ann %.1f s, query %.1f s (scan %.1f s)", summary.seconds, report["seconds"],
             report["scan_seconds"])
    return {"build_seconds": summary.seconds, "bytes": summary.bytes, "n_lists": summary.n_lists,
            "query": report}
