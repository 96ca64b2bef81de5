"""The performance benchmark sized for a GPU machine, within a time budget (default 10 minutes).

    python -m benchmarks.perf.gpu [--out benchmarks/results/perf-gpu.md] [--work DIR] [--model DIR]
        [--pool DIR --targets DIR] [--max-vectors 100M] [--budget-seconds 600]

It runs the sections of benchmarks.perf.run with the model on CUDA, because
trimdb.models.load_model picks CUDA when torch finds a GPU. The synthetic scale is larger: sizes
double from 1M vectors up to --max-vectors, cut to fit the free disk twice over, and a size is
skipped once its projected time passes the budget. When faiss.get_num_gpus() > 0 it also
measures a GPU scan bound: the largest synthetic store decoded in chunks and searched for each
token's nearest fingerprint with faiss.knn_gpu, which is the arithmetic of the query scan
without the token-class lookup. trimdb's own query scan runs on the CPU.

Without a GPU it runs on the CPU with small sizes (200k and 1M vectors, 40 records per pool
source), so it can be checked anywhere. A machine without network needs the model folder
(--model) and the demo data (--pool, --targets: written by `python -m trimdb.demo_data DIR`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import torch

from trimdb.codecs import CODECS
from trimdb.query import SCAN_CHUNK
from trimdb.store import Store
from benchmarks.perf.codec_table import load_fingerprints
from benchmarks.perf.machine import describe_machine
from benchmarks.perf.page import Results, render_page
from benchmarks.perf.run import Config, parse_codecs, run_benchmarks
from benchmarks.perf.scale import parse_size

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("benchmarks/results/perf-gpu.md")
CPU_SIZES = ("200k", "1M")
CPU_PER_SOURCE = 40
FIRST_GPU_SIZE = 1_000_000
# Vectors decoded and searched per knn_gpu call: 1M x 576 float32 is 2.3 GB on the host and the GPU.
GPU_CHUNK = 16 * SCAN_CHUNK


def gpu_sizes(max_vectors: int) -> list[int]:
    """Return sizes doubling from 1M vectors up to ``max_vectors``, which is always the last."""
    sizes, size = [], FIRST_GPU_SIZE
    while size < max_vectors:
        sizes.append(size)
        size *= 2
    return sizes + [max_vectors]


def gpu_scan_bound(db_path: Path, run_id: int, task: str) -> dict:
    """Time the nearest-fingerprint search of every stored vector of ``db_path`` on the GPU.

    Each chunk is decoded on the CPU (as the query scan does) and searched with faiss.knn_gpu
    against the fingerprints that query run ``run_id`` stored for ``task``.
    """
    fingerprints = load_fingerprints(db_path, run_id)[task].vectors
    resources = faiss.StandardGpuResources()
    decode = search = 0.0
    n_vectors = 0
    with Store(db_path, read_only=True) as store:
        for segment in store.segments():
            chunks = store.iter_vectors(segment, GPU_CHUNK)
            while True:
                started = time.perf_counter()
                chunk = next(chunks, None)
                decode += time.perf_counter() - started
                if chunk is None:
                    break
                started = time.perf_counter()
                faiss.knn_gpu(resources, chunk[1], fingerprints, 1, metric=faiss.METRIC_INNER_PRODUCT)
                search += time.perf_counter() - started
                n_vectors += len(chunk[1])
    return {"n_vectors": n_vectors, "decode_seconds": decode, "search_seconds": search}


def _gpu_scan_lines(bound: dict | None) -> list[str]:
    if bound is None:
        return ["## 6. GPU scan bound", "", f"Not run: FAISS sees {faiss.get_num_gpus()} GPUs.", ""]
    rate = bound["n_vectors"] / bound["search_seconds"]
    return [
        "## 6. GPU scan bound", "",
        f"faiss.knn_gpu (k = 1, inner product) over {bound['n_vectors']:,} decoded synthetic vectors against the "
        f"task's fingerprints: search {bound['search_seconds']:.1f} s ({rate / 1e6:.1f} M tokens/s), decoding on "
        f"the CPU {bound['decode_seconds']:.1f} s. This is not trimdb's query path, which scans on the CPU.", "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results page (default {DEFAULT_OUT})")
    parser.add_argument("--work", type=Path, help="working folder, kept afterwards (default: a temporary folder)")
    parser.add_argument("--model", help="model folder (default: trimdb's embedded model)")
    parser.add_argument("--pool", type=Path, help="pool folder (default: build the demo pool)")
    parser.add_argument("--targets", type=Path, help="folder with gsm8k.jsonl and mmlu.jsonl (with --pool)")
    parser.add_argument("--max-vectors", default="100M", help="largest synthetic store (default 100M)")
    parser.add_argument("--layers", type=int, help="last attention layers averaged into saliency (default: trimdb's)")
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated codecs of section 3 (default: all)")
    parser.add_argument("--budget-seconds", type=float, default=600, help="time budget of the run (default 600)")
    args = parser.parse_args(argv)
    if (args.pool is None) != (args.targets is None):
        parser.error("--pool and --targets go together")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    started = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    work = args.work or Path(tempfile.mkdtemp(prefix="trimdb-perf-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    config = Config(
        work=work.resolve(), model=args.model,
        per_source=250 if on_gpu else CPU_PER_SOURCE,
        scale_sizes=gpu_sizes(parse_size(args.max_vectors)) if on_gpu else [parse_size(s) for s in CPU_SIZES],
        pool=args.pool, targets=_target_files(args.targets) if args.targets else None,
        # Records of a given pool may lack a source field; each file's name then names its source.
        source_column=None if args.pool else "source",
        deadline=started + args.budget_seconds if on_gpu else None,
        keep_scale=faiss.get_num_gpus() > 0,
        layers=args.layers,
        codecs=parse_codecs(args.codecs),
    )
    command = shlex.join(["python", "-m", "benchmarks.perf.gpu", *(sys.argv[1:] if argv is None else argv)])
    results = Results(command=command, machine=describe_machine(config.work), pool={})
    if not on_gpu:
        results.notes.append("No CUDA device: CPU fallback with small sizes, to check that the script runs.")
    try:
        run_benchmarks(config, results, args.out)
        bound = None
        if faiss.get_num_gpus() > 0 and results.scale:
            bound = gpu_scan_bound(config.work / "scale" / "synthetic.duckdb", results.scale[-1].query["run_id"],
                                   config.task)
        args.out.write_text(render_page(results) + "\n".join(_gpu_scan_lines(bound)) + "\n")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    log.info("wrote %s in %.0f s", args.out, time.perf_counter() - started)


def _target_files(folder: Path) -> dict[str, Path]:
    files = {path.stem: path for path in sorted(folder.glob("*.jsonl"))}
    if "gsm8k" not in files:
        raise SystemExit(f"{folder} has no gsm8k.jsonl; write the demo targets with `python -m trimdb.demo_data DIR`")
    return files


if __name__ == "__main__":
    main()
