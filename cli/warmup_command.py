"""`trimdb warmup`: LoRA fine-tune the base model on a random share of the pool."""

from __future__ import annotations

import click
from rich.console import Console

from cli.options import format_option, model_option, progress_option
from trimdb.records import ON_ERROR
from trimdb.settings import DTYPES
from trimdb.warmup import PRESETS, resolve_settings, warmup as run_warmup

PRESET_HELP = "; ".join(
    f"{name}: rank {s.rank}, alpha {s.alpha:g}, dropout {s.dropout:g}, learning rate {s.learning_rate:g}, "
    f"{s.epochs} epoch{'s' if s.epochs > 1 else ''}, max length {s.max_length}, {s.dtype}"
    for name, s in PRESETS.items()
)


@click.command()
@click.argument("corpus", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), metavar="ADAPTER_DIR",
              help="Folder to write the adapter and trimdb-warmup.json to; it must not exist or be empty.")
@model_option
@format_option
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help=f"Starting settings, which the flags below override ({PRESET_HELP}). "
                   "Default: less when torch sees a CUDA GPU, else cpu.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Share of the pool's distinct samples to train on, picked at random. Default: 0.05.")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Seed of the sample pick, the LoRA initialization, dropout and batch order. Default: 0.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Passes over the picked samples.")
@click.option("--rank", type=click.IntRange(min=1), default=None, help="LoRA rank r.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=None,
              help="LoRA alpha; the adapter's update is scaled by alpha / rank.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None, help="LoRA dropout probability.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak AdamW learning rate, reached after the warmup steps and then decayed linearly to 0.")
@click.option("--warmup-ratio", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Share of the optimizer steps over which the learning rate rises from 0.")
@click.option("--batch-tokens", type=click.IntRange(min=8), default=None,
              help="Maximum padded tokens per forward batch; lower it when memory runs out.")
@click.option("--accumulation-steps", type=click.IntRange(min=1), default=None,
              help="Forward batches whose gradients add up to one optimizer step.")
@click.option("--max-length", type=click.IntRange(min=8), default=None,
              help="Maximum tokens per sample; longer samples lose prompt tokens first.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this many optimizer steps. Default: run every epoch.")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Dtype of the base model's weights.")
@click.option("--plain-template", is_flag=True, default=None,
              help="Render samples with trimdb's plain template; pass it when the index uses --plain-template.")
@click.option("--on-error", type=click.Choice(ON_ERROR), default="stop", show_default=True,
              help="On a bad record: stop, or skip it (and count it in trimdb-warmup.json).")
@progress_option
def warmup(corpus, out_dir, model, record_format, preset, on_error, progress, **overrides):
    """LoRA fine-tune the model on a random share of CORPUS and save the adapter to --out.

    Only the response tokens of the picked samples count in the loss. Pass the adapter folder to
    `trimdb index --adapter` (and to `trimdb query --adapter` when --model is given): it is merged
    into the model's weights, and the index rejects queries with another adapter or none.

    \b
    trimdb warmup pool.jsonl --out adapters/pool-5pct
    trimdb warmup data/ --out adapters/less --preset less --fraction 0.05 --seed 1
    """
    preset, settings = resolve_settings(preset, **overrides)
    arguments = {"corpus": list(corpus), "model": model, "preset": preset, "format": record_format,
                 "on_error": on_error, "overrides": {k: v for k, v in overrides.items() if v is not None}}
    summary = run_warmup(list(corpus), out_dir, model=model, settings=settings, format=record_format,
                         on_error=on_error, progress=progress, arguments=arguments)
    console = Console()
    console.print(
        f"trained on {len(summary.sample_ids)} of {summary.n_pool} pool samples ({summary.n_response_tokens} response "
        f"tokens) for {summary.n_steps} steps in {summary.seconds:.1f} s; loss {summary.losses[0]:.4f} at the first "
        f"step, {summary.losses[-1]:.4f} at the last; preset {preset}",
        highlight=False,
    )
    if summary.skipped:
        console.print(f"skipped {len(summary.skipped)} bad records")
    console.print(f"adapter: {out_dir}. Use it with: trimdb index CORPUS --db pool.duckdb --adapter {out_dir}",
                  highlight=False, soft_wrap=True)
