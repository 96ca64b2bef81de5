"""Measure how well TRIM's coresets teach a target task, against baselines; write the results page.

    python -m benchmarks.quality.run [--quick] [--long] [--work DIR] [--out benchmarks/results/quality.md]

Builds a labelled pool, three target tasks (GSM8K, MMLU, BBH) and held-out evaluation sets from
pinned registry packages, indexes the pool once, and runs TRIM and each baseline at 1% and 5%
budgets. It reports relevance, downstream held-out loss after LoRA fine-tunes, selection cost,
coreset lengths and ablations of TRIM's settings (benchmarks/quality/pipeline.py lists the
stages). The index and the adapters are cached in the working folder between runs.

Modes:
- ``--quick``: a pool of about 600, a few training steps, no accuracy and no warmup ablation,
  meant to finish in under 15 minutes on 2 idle CPU cores (11 minutes from an empty working
  folder in the recorded check);
- full (the default): a pool of about 3,000, GSM8K accuracy, and the downstream test of the best
  ablations, meant for 100 minutes on 2 CPU cores;
- ``--long``: the full mode plus fine-tuning on the whole pool, meant for a GPU.
On a CPU, LESS runs only when ``--methods`` names it (see CPU_METHODS).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from pathlib import Path

import torch

from benchmarks.perf.machine import describe_machine
from benchmarks.quality.data import PoolSpec
from benchmarks.quality.page import render_page
from benchmarks.quality.pipeline import Config, run_benchmark
from benchmarks.quality.plots import write_plots
from benchmarks.quality.training import TrainSettings
from trimdb.assets import cache_dir
from trimdb.settings import METHODS, IndexSettings

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("benchmarks/results/quality.md")

# About 600 samples of at most 1,200 characters (95 k tokens): the index pass took about 300 CPU
# seconds on an AMD EPYC with bf16 (torch 2.13), so about 2.5 minutes on 2 idle cores.
# One record from each of 200 OpenAI-evals sets spreads the evals part over many related sets.
QUICK_POOL = PoolSpec(sharegpt=120, evals=200, humaneval=80, gsm8k_in_pool=50, hellaswag=100, truthfulqa=100,
                      bigbench=100, evals_per_set=1, bigbench_per_task=5, max_chars=1200, n_eval=10)
# About 3,100 samples (3,700 with BIG-bench) of at most 1,500 characters, about 625 k tokens with
# the chat template: 12 minutes per index pass on 2 idle cores in the recorded run.
FULL_POOL = PoolSpec(sharegpt=1950, evals=900, humaneval=164, gsm8k_in_pool=60, hellaswag=100, truthfulqa=100,
                     bigbench=600, bigbench_per_task=10, max_chars=1500, n_eval=32)
# Candidate saliency is stored for inspection only and scores never read it, so the index skips it.
# float32 vectors keep every method's scores exact.
QUICK_INDEX = IndexSettings(dtype="bfloat16", max_length=512, batch_tokens=4096, store_saliency=False,
                            codec="float32")
FULL_INDEX = IndexSettings(dtype="bfloat16", max_length=1024, batch_tokens=8192, store_saliency=False,
                           codec="float32")
QUICK_TRAIN = TrainSettings(epochs=2, max_steps=4, batch_tokens=1024, max_length=512)
FULL_TRAIN = TrainSettings(epochs=1, max_steps=8, batch_tokens=2048, max_length=1024)


# LESS runs a forward and a backward pass per pool sample and query. On 2 cores it took 472 s on the
# quick pool and 2,894 s on the full pool (2.9 and 3.9 index passes), which takes both modes past
# their time targets. So the CPU modes leave it out unless --methods names it, and with a CUDA GPU
# every mode runs it.
CPU_METHODS = ("trim", "random", "bm25", "embedding")


def make_config(mode: str, work: Path) -> Config:
    """Return the configuration of a mode: quick, full or long."""
    methods = None if torch.cuda.is_available() else CPU_METHODS
    if mode == "quick":
        # The warmup ablation trains an adapter and indexes the pool a second time (about 3.5 of the
        # quick mode's minutes), so only the full modes run it.
        return Config(mode, work, QUICK_POOL, QUICK_INDEX, QUICK_TRAIN, n_accuracy=0, downstream_ablations=0,
                      methods=methods, warmup_ablation=False)
    config = Config(mode, work, FULL_POOL, FULL_INDEX, FULL_TRAIN, n_accuracy=24, downstream_ablations=2,
                    methods=methods)
    if mode == "long":
        config = dataclasses.replace(config, full_pool_training=True)
    return config


def write_results(results: dict, out: Path, command: str) -> None:
    """Write the plots next to ``out`` (in ``<out stem>/``) and the page itself."""
    plot_folder = out.parent / out.stem
    plots = write_plots(results, plot_folder)
    relative = {name: os.path.relpath(path, out.parent) for name, path in plots.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(results, results["machine"], command, relative), encoding="utf-8")
    log.info("wrote %s and %d plots into %s", out, len(plots), plot_folder)


def parse_methods(text: str) -> tuple[str, ...]:
    """Parse "trim,bm25,less" into method names, with trim first; raise SystemExit on an unknown name."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown method {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    return ("trim", *[name for name in names if name != "trim"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.run", description=__doc__.splitlines()[0])
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", action="store_true", help="small pool and few training steps (under 15 min)")
    modes.add_argument("--long", action="store_true", help="full mode plus fine-tuning on the whole pool (GPU)")
    parser.add_argument("--work", type=Path, help="working folder with the cached index and adapters "
                        "(default: <trimdb cache>/benchmarks/quality-<mode>)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results page (default {DEFAULT_OUT})")
    parser.add_argument("--no-bigbench", action="store_true", help="leave BIG-bench out of the pool")
    parser.add_argument("--methods", help="comma-separated selection methods to run (trim always runs; default: "
                        f"{','.join(CPU_METHODS)} on a CPU, every method this trimdb offers with a CUDA GPU)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--note", action="append", default=[], help="a line for the page's notes (repeatable)")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the page and plots from <work>/results.json without running anything")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mode = "full"
    if args.quick:
        mode = "quick"
    elif args.long:
        mode = "long"
    work = args.work or cache_dir() / "benchmarks" / f"quality-{mode}"
    config = dataclasses.replace(make_config(mode, work), bigbench=not args.no_bigbench, progress=args.progress)
    if args.methods:
        config = dataclasses.replace(config, methods=parse_methods(args.methods))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    command = shlex.join(["python", "-m", "benchmarks.quality.run", *(sys.argv[1:] if argv is None else argv)])
    if args.render_only:
        results = json.loads((work / "results.json").read_text())
        results["notes"] += args.note
        write_results(results, args.out, results["command"])
        return
    work.mkdir(parents=True, exist_ok=True)
    results = run_benchmark(config, machine=describe_machine(work), command=command)
    results["notes"] += args.note
    write_results(results, args.out, command)


if __name__ == "__main__":
    main()
