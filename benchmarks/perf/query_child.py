"""Run one `trimdb query` in this process and print its timings and peak memory as one JSON line.

The scale curve starts this module in a fresh process per store size, so the peak resident set
size (ru_maxrss) belongs to that one query and to nothing measured before it.

    python -m benchmarks.perf.query_child --db pool.duckdb --task gsm8k=gsm8k.jsonl [--budget 5%]
        [--candidates auto|N]
"""

from __future__ import annotations

import argparse
import json
import time

import trimdb.query
from trimdb.settings import SaliencySettings, ScoreSettings
from benchmarks.perf.timing import current_rss_bytes, peak_rss_bytes, record_calls, ru_maxrss_bytes


def timed_query(db_path: str, tasks: dict[str, str], budget: str = "5%", model: str | None = None,
                candidates: int | str | None = None, layers: int | None = None) -> dict:
    """Run query_tasks once and return its wall time, model-load time and scan time in seconds.

    The scan is trimdb.query._scan for the exact path and _scan_candidates with ``candidates``.
    """
    loads: list[float] = []
    scans: list[float] = []
    scan_function = "_scan" if candidates is None else "_scan_candidates"
    settings = ScoreSettings() if layers is None else ScoreSettings(saliency=SaliencySettings(layers=layers))
    started = time.perf_counter()
    with record_calls(trimdb.query, "load_model", loads), record_calls(trimdb.query, scan_function, scans):
        result = trimdb.query.query_tasks(db_path, tasks, budget, model=model, candidates=candidates,
                                          settings=settings, progress=False)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "load_seconds": sum(loads),
        "scan_seconds": sum(scans),
        "run_id": result.run_id,
        "n_scored": {task.task: task.n_scored for task in result.tasks},
        "n_fingerprints": {task.task: len(task.fingerprints) for task in result.tasks},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.query_child", description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="trimdb database to query")
    parser.add_argument("--task", action="append", required=True, help="NAME=FILE target task (repeatable)")
    parser.add_argument("--budget", default="5%", help="coreset budget, as in `trimdb query` (default 5%%)")
    parser.add_argument("--candidates", help="approximate query: nearest samples per target sample, or auto")
    parser.add_argument("--layers", type=int, help="last attention layers averaged into saliency (default: trimdb's)")
    args = parser.parse_args(argv)
    tasks = dict(task.split("=", 1) for task in args.task)
    candidates = args.candidates if args.candidates in (None, "auto") else int(args.candidates)
    before = current_rss_bytes()
    report = timed_query(args.db, tasks, args.budget, candidates=candidates, layers=args.layers)
    report["rss_before_query_bytes"] = before
    report["peak_rss_bytes"], report["peak_rss_source"] = peak_rss_bytes()
    report["ru_maxrss_bytes"] = ru_maxrss_bytes()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
