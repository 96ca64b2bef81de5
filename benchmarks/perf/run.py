"""Measure index overhead, query speed, codecs and the scale curve in one run; write the results page.

    python -m benchmarks.perf.run [--quick] [--out benchmarks/results/perf.md] [--work DIR]

Sections, in order (each later one uses what the earlier ones built):
1. index overhead on the real demo pool: bare forward against `index_corpus` with and without
   stored saliency;
2. query time of one target task against recomputing TRIM with forward passes, and scan rate;
3. every vector codec: bytes per token and selection quality against float32;
4. the approximate query path (trimdb.ann): build cost, query time, overlap with the exact scan;
5. query time and peak memory on synthetic stores of growing size.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from trimdb.codecs import CODECS
from trimdb.demo_data import DEFAULT_PER_SOURCE, build_demo_pool, build_demo_targets
from trimdb.settings import IndexSettings, SaliencySettings
from trimdb.store import Store
from benchmarks.perf.codec_table import default_codec, measure_codecs
from benchmarks.perf.machine import describe_machine
from benchmarks.perf.overhead import measure_overhead
from benchmarks.perf.page import Results, render_page, write_plot
from benchmarks.perf.querying import measure_ann, measure_query
from benchmarks.perf.scale import measure_scale, parse_size
from benchmarks.perf.synthetic import SyntheticSpec, catalog_for, fit_sizes

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("benchmarks/results/perf.md")
FULL_SIZES = ("1M", "5M", "20M")
QUICK_SIZES = ("200k", "1M")
QUICK_PER_SOURCE = 40
# Product quantization can train for longer than the rest of the run on 576 dimensions, so a
# codec still encoding after this many seconds is stopped and listed without figures.
DEFAULT_CODEC_TIMEOUT = 300
# The codec of the scale stores when no codec meets the default-codec rule of section 3.
FALLBACK_SCALE_CODEC = "sq8"


@dataclass
class Config:
    """Settings of one benchmark run: the data, the model, the sizes and the working folder."""

    work: Path
    per_source: int = DEFAULT_PER_SOURCE
    dtype: str = "bfloat16"
    model: str | None = None
    scale_sizes: list[int] = field(default_factory=lambda: [parse_size(size) for size in FULL_SIZES])
    scale_codec: str = "auto"
    scale_chunk: int | None = None
    pool: Path | None = None
    targets: dict[str, Path] | None = None
    source_column: str | None = "source"
    task: str = "gsm8k"
    # Last attention layers averaged into saliency; None keeps trimdb's default.
    layers: int | None = None
    # time.perf_counter() value after which no further scale size starts (benchmarks.perf.scale).
    deadline: float | None = None
    # Keep the synthetic store after the scale curve (in work/scale).
    keep_scale: bool = False
    # Repetitions of the timed query in section 2; the fastest is reported.
    query_repeats: int = 2
    # Smallest scale sizes at which the approximate path is timed too.
    scale_ann_sizes: int = 1
    # Seconds after which one codec's training and encoding is stopped (section 3).
    codec_timeout: float | None = DEFAULT_CODEC_TIMEOUT
    codecs: list[str] = field(default_factory=lambda: list(CODECS))


def prepare_data(config: Config) -> tuple[Path, dict[str, Path]]:
    """Return the pool folder and target files: the given ones, or the demo pool built under work."""
    if config.pool is not None and config.targets is not None:
        return config.pool, config.targets
    data = config.work / "data"
    started = time.perf_counter()
    build_demo_pool(data / "pool", config.per_source)
    targets = build_demo_targets(data / "targets")
    log.info("built the demo pool and targets in %.1f s", time.perf_counter() - started)
    return data / "pool", targets


def run_benchmarks(config: Config, results: Results, page: Path | None = None) -> Results:
    """Run every section in order, filling ``results``; rewrite ``page`` after each section."""
    started = time.perf_counter()

    def checkpoint() -> None:
        results.total_seconds = time.perf_counter() - started
        if hasattr(os, "getloadavg"):
            results.machine["load_average_end"] = os.getloadavg()
        if page is not None:
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(render_page(results))

    pool, targets = prepare_data(config)
    settings = IndexSettings(dtype=config.dtype)
    description = (f"the real demo pool (`build_demo_pool`, at most {config.per_source} records per source)"
                   if config.pool is None else f"the records in {config.pool}")
    results.pool.update(description=description, dtype=config.dtype, batch_tokens=settings.batch_tokens,
                        max_length=settings.max_length)
    try:
        saliency = SaliencySettings() if config.layers is None else SaliencySettings(layers=config.layers)
        results.overhead, db_path = measure_overhead(pool, config.work, dtype=config.dtype, model=config.model,
                                                     source_column=config.source_column, saliency=saliency)
        with Store(db_path, read_only=True) as store:
            results.pool["model"] = store.catalog()["model"]["name"]
        checkpoint()
        results.query = measure_query(db_path, targets, config.task, repeats=config.query_repeats,
                                      layers=config.layers)
        checkpoint()
        results.codecs = measure_codecs(db_path, results.query.both_tasks["run_id"], config.work / "codecs",
                                        config.codecs, config.codec_timeout)
        checkpoint()
        results.ann = measure_ann(db_path, targets, results.query.both_tasks, layers=config.layers)
        checkpoint()
        _run_scale(config, results, db_path, targets[config.task], page)
    except BaseException as error:
        results.notes.append(f"The run stopped with {type(error).__name__}: {error}; later sections are missing.")
        raise
    finally:
        checkpoint()
    return results


def _run_scale(config: Config, results: Results, db_path: Path, target: Path, page: Path | None) -> None:
    with Store(db_path, read_only=True) as store:
        source_catalog = store.catalog()
    dim = int(source_catalog["model"]["hidden_size"])
    results.pool.update(dim=dim, vocab_size=int(source_catalog["model"]["vocab_size"]))
    codec = config.scale_codec
    if codec == "auto":
        float32 = next((row for row in results.codecs or [] if row.codec == "float32"), None)
        best = default_codec(results.codecs, float32.code_bytes_per_token)[0] if float32 else None
        codec = best.codec if best else FALLBACK_SCALE_CODEC
        results.scale_notes.append(
            f"Codec `{codec}`: " + ("the codec that section 3 picks." if best else
                                    "no codec meets the rule of section 3, so the scale stores use sq8."))
    results.scale_codec = codec
    folder = config.work / "scale"
    sizes, note = fit_sizes(config.scale_sizes, folder, codec, dim)
    if note:
        results.scale_notes.append(note)
    spec = SyntheticSpec(catalog_for(source_catalog, codec), codec,
                         vocab_size=int(source_catalog["model"]["vocab_size"]))
    if config.scale_chunk:
        spec.chunk_vectors = config.scale_chunk
    results.scale = measure_scale(folder, sizes, spec, config.task, target, ann_sizes=config.scale_ann_sizes,
                                  layers=config.layers,
                                  deadline=config.deadline, notes=results.scale_notes, keep=config.keep_scale)
    if page is not None:
        results.plot = write_plot(results.scale, page.with_name(f"{page.stem}-scale.png"))


def parse_codecs(text: str) -> list[str]:
    """Parse a comma-separated codec list; raise SystemExit naming an unknown codec."""
    codecs = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in codecs if name not in CODECS]
    if unknown or not codecs:
        raise SystemExit(f"invalid --codecs {text!r}: choose from {', '.join(CODECS)}")
    if "float32" not in codecs:
        raise SystemExit("--codecs must include float32, the reference of the codec table")
    return codecs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"small run: {QUICK_PER_SOURCE} records per pool source, scale sizes "
                             f"{', '.join(QUICK_SIZES)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results page (default {DEFAULT_OUT})")
    parser.add_argument("--work", type=Path, help="working folder, kept afterwards (default: a temporary "
                                                  "folder, deleted afterwards)")
    parser.add_argument("--per-source", type=int, help=f"demo pool records per source (default "
                                                       f"{DEFAULT_PER_SOURCE}, {QUICK_PER_SOURCE} with --quick)")
    parser.add_argument("--scale-sizes", help=f"comma-separated stored-vector counts (default "
                                              f"{','.join(FULL_SIZES)}, {','.join(QUICK_SIZES)} with --quick)")
    parser.add_argument("--scale-codec", default="auto", choices=["auto", *CODECS],
                        help="codec of the synthetic stores; auto takes the codec section 3 picks, else sq8")
    parser.add_argument("--codecs", default=",".join(CODECS),
                        help=f"comma-separated codecs of section 3 (default: all, {','.join(CODECS)})")
    parser.add_argument("--codec-timeout", type=float, default=DEFAULT_CODEC_TIMEOUT,
                        help=f"seconds after which one codec's encoding is stopped (default {DEFAULT_CODEC_TIMEOUT})")
    parser.add_argument("--note", action="append", default=[],
                        help="line to print under the run's facts, such as other load on the machine (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    if args.scale_sizes:
        sizes = args.scale_sizes.split(",")
    work = args.work or Path(tempfile.mkdtemp(prefix="trimdb-perf-"))
    work.mkdir(parents=True, exist_ok=True)
    config = Config(
        work=work.resolve(),
        per_source=args.per_source or (QUICK_PER_SOURCE if args.quick else DEFAULT_PER_SOURCE),
        scale_sizes=[parse_size(size) for size in sizes],
        scale_codec=args.scale_codec,
        codec_timeout=args.codec_timeout,
        codecs=parse_codecs(args.codecs),
    )
    command = shlex.join(["python", "-m", "benchmarks.perf.run", *(sys.argv[1:] if argv is None else argv)])
    results = Results(command=command, machine=describe_machine(config.work), pool={})
    results.notes.extend(args.note)
    try:
        run_benchmarks(config, results, args.out)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
