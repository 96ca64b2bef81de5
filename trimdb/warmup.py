"""`trimdb warmup`: a short LoRA fine-tune of the base model on a random share of the pool.

TRIM reads saliency and hidden states from a model that has seen the pool's format. The warmup
fine-tunes LoRA adapters on the attention projections over a seeded random share of the pool.
`trimdb index --adapter` and `trimdb query --adapter` then merge the adapter into the weights.

Stages, in order:
1. read the pool, drop repeated samples, and pick a seeded random ``fraction`` of the rest;
2. render the picked samples with the model's chat template (or the plain template); the loss
   counts response tokens only, every other label is -100;
3. train with AdamW and a linear schedule with warmup steps, in length-bucketed batches;
4. save the adapter (peft ``save_pretrained``) and ``trimdb-warmup.json`` with the resolved
   settings, the sample ids, the base model's identity and the losses into a temporary folder,
   then rename it to ``out_dir``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from trimdb import __version__
from trimdb.errors import InputError, RenderError, SettingsError
from trimdb.forward import plan_batches
from trimdb.models import WARMUP_RECORD, LoadedModel, load_model, quiet_peft
from trimdb.records import ON_ERROR, Sample, SkippedRecord, read_corpus
from trimdb.render import RESPONSE, Renderer
from trimdb.settings import DTYPES

log = logging.getLogger(__name__)

# LoRA targets the attention projections, as in the LESS recipe, under their Llama-family names.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
IGNORE_INDEX = -100  # label of tokens that the loss skips (PyTorch cross_entropy's ignore_index)
# Gradient norm clip: the default max_grad_norm of transformers' Trainer, which LESS trains with.
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class WarmupSettings:
    """Switches of the warmup fine-tune. The defaults are the `cpu` preset (see PRESETS)."""

    # Share of the pool's distinct samples to train on, picked at random with ``seed``.
    fraction: float = 0.05
    # Seeds the sample pick, the LoRA initialization, dropout and the batch order.
    seed: int = 0
    epochs: int = 1
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    learning_rate: float = 2e-4
    # Share of the optimizer steps over which the learning rate rises linearly from 0.
    warmup_ratio: float = 0.03
    # Samples are rendered and truncated as by `trimdb index` (prompt tokens go first).
    max_length: int = 512
    # Upper bound on padded tokens per forward batch; bounds activation memory.
    batch_tokens: int = 1024
    # Forward batches whose gradients add up to one optimizer step.
    accumulation_steps: int = 1
    # Stop after this many optimizer steps, even within an epoch; None runs every epoch.
    max_steps: int | None = None
    dtype: str = "float32"
    plain_template: bool = False

    def validate(self) -> None:
        if not 0 < self.fraction <= 1:
            raise SettingsError(
                f"warmup fraction must be in (0, 1], got {self.fraction}; 0.05 trains on 5% of the pool"
            )
        for name in ("epochs", "rank", "accumulation_steps"):
            if getattr(self, name) < 1:
                raise SettingsError(f"warmup {name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise SettingsError(f"warmup max steps must be at least 1, got {self.max_steps}")
        if self.alpha <= 0 or self.learning_rate <= 0:
            raise SettingsError(
                f"LoRA alpha and learning rate must be positive, got alpha {self.alpha} and "
                f"learning rate {self.learning_rate}"
            )
        if not 0 <= self.dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise SettingsError(
                f"dropout and warmup ratio must be in [0, 1), got dropout {self.dropout} and "
                f"warmup ratio {self.warmup_ratio}"
            )
        self._validate_lengths()

    def _validate_lengths(self) -> None:
        if self.max_length < 8:
            raise SettingsError(f"max length must be at least 8 tokens, got {self.max_length}")
        if self.batch_tokens < self.max_length:
            raise SettingsError(
                f"batch tokens ({self.batch_tokens}) must be at least the max length ({self.max_length})"
            )
        if self.dtype not in DTYPES:
            raise SettingsError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # The LESS warmup recipe (Xia et al., "LESS: Selecting Influential Data for Targeted Instruction
    # Tuning", arXiv:2402.04333, 2024), as set in less/scripts/train/base_training_args.sh of
    # github.com/princeton-nlp/LESS. It trains LoRA rank 128, alpha 512, dropout 0.1 on q/k/v/o_proj
    # with AdamW at 2e-5, linear decay after 3% warmup steps, 4 epochs, 2048-token sequences, bf16.
    # LESS takes 32 sequences per optimizer step (batch 1, 32 accumulation steps). trimdb batches by
    # padded tokens, and 4 batches of 16,384 tokens hold 32 sequences of 2,048 tokens.
    "less": WarmupSettings(
        epochs=4, rank=128, alpha=512.0, dropout=0.1, learning_rate=2e-5, warmup_ratio=0.03,
        max_length=2048, batch_tokens=16384, accumulation_steps=4, dtype="bfloat16",
    ),
    # trimdb's CPU setting for SmolLM2-135M-Instruct: a small adapter, 10 times LESS's learning rate
    # for the single epoch, and 512-token samples. On the demo pool's 5% (46 samples, 10,294 tokens,
    # 13 steps), the whole `trimdb warmup` run used 91 s of CPU time on one thread (torch 2.13, on
    # a shared 2-core machine). An estimate for 2 idle cores is therefore 1 to 1.5 minutes.
    "cpu": WarmupSettings(),
}


def default_preset() -> str:
    """Return the preset used when none is given: `less` with a CUDA GPU, else `cpu`."""
    return "less" if torch.cuda.is_available() else "cpu"


def resolve_settings(preset: str | None = None, **overrides) -> tuple[str, WarmupSettings]:
    """Return the preset's name and its settings with every override that is not None applied."""
    name = preset or default_preset()
    if name not in PRESETS:
        raise SettingsError(f"unknown warmup preset {name!r}: expected one of {', '.join(PRESETS)}")
    known = {f.name for f in dataclasses.fields(WarmupSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SettingsError(f"unknown warmup settings {', '.join(unknown)}: expected some of {', '.join(sorted(known))}")
    chosen = {key: value for key, value in overrides.items() if value is not None}
    return name, dataclasses.replace(PRESETS[name], **chosen)


@dataclass
class WarmupSummary:
    """Samples, losses and output folder of one warmup run."""

    out_dir: Path
    settings: WarmupSettings
    n_pool: int
    sample_ids: list[str]
    n_tokens: int
    n_response_tokens: int
    n_truncated: int
    losses: list[float] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_steps(self) -> int:
        return len(self.losses)


@dataclass
class _Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def warmup(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    model: str | None = None,
    settings: WarmupSettings | None = None,
    format: str | None = None,
    on_error: str = "stop",
    progress: bool = True,
    arguments: dict | None = None,
) -> WarmupSummary:
    """Fine-tune LoRA adapters on a random share of the pool in ``paths`` and save them to ``out_dir``.

    ``settings`` defaults to the default preset's; the adapter loads with ``load_model(adapter=out_dir)``.
    """
    settings = settings or resolve_settings()[1]
    settings.validate()
    out_dir = Path(out_dir)
    _check_inputs(paths, out_dir, on_error)
    started = time.perf_counter()
    skipped: list[SkippedRecord] = []
    samples, n_pool = choose_samples(paths, settings.fraction, settings.seed, format=format, on_error=on_error,
                                     skipped=skipped)

    loaded = load_model(model, dtype=settings.dtype)
    renderer = Renderer(loaded.tokenizer, max_length=settings.max_length, plain_template=settings.plain_template or None)
    identity = loaded.identity(renderer.template_sha256)
    examples, kept = _examples(samples, renderer, on_error, skipped)
    summary = WarmupSummary(
        out_dir, settings, n_pool, [sample.sample_id for sample in kept],
        n_tokens=sum(len(e.input_ids) for e in examples),
        n_response_tokens=sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples),
        n_truncated=sum(e.truncated for e in examples), skipped=skipped,
    )
    log.info("warmup on %d of %d pool samples (%d tokens, %d response tokens), %d skipped",
             len(examples), n_pool, summary.n_tokens, summary.n_response_tokens, len(skipped))

    peft_model = _lora_model(loaded, settings)
    summary.losses = _train(peft_model, examples, settings, loaded.pad_id, progress)
    summary.seconds = time.perf_counter() - started
    record = _record(summary, identity, [str(p) for p in paths], arguments or {})
    _save(peft_model, out_dir, record)
    log.info("saved the adapter to %s after %d steps in %.1f s (loss %.4f to %.4f)", out_dir, summary.n_steps,
             summary.seconds, summary.losses[0], summary.losses[-1])
    return summary


def _check_inputs(paths, out_dir: Path, on_error: str) -> None:
    if not paths:
        raise SettingsError("no corpus files given; pass at least one JSONL, JSON or Parquet file or a folder")
    if on_error not in ON_ERROR:
        raise SettingsError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    _check_out_dir(out_dir)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SettingsError(f"output folder {out_dir} already exists and is not empty; pass a new --out or remove it")


def choose_samples(
    paths: Sequence[str | Path], fraction: float, seed: int, *, format: str | None = None, on_error: str = "stop",
    skipped: list[SkippedRecord] | None = None,
) -> tuple[list[Sample], int]:
    """Return a seeded random ``fraction`` of the pool's distinct samples and the number of distinct samples.

    Samples are drawn from the sorted sample ids, so the pick does not depend on file order.
    """
    options = {"format": format, "on_error": on_error, "skipped": skipped if skipped is not None else []}
    # The first pass keeps ids only, so memory does not grow with the records of a large pool.
    ids = sorted({sample.sample_id for sample in read_corpus(paths, **options)})
    if not ids:
        raise InputError(", ".join(map(str, paths)), None, None, "the pool has no readable records",
                         "pass the corpus files that trimdb index reads")
    count = math.ceil(fraction * len(ids))
    chosen = set(random.Random(seed).sample(ids, count))
    options["skipped"] = []  # the first pass has counted the bad records already
    picked: dict[str, Sample] = {}
    for sample in read_corpus(paths, **options):
        if sample.sample_id in chosen:
            picked.setdefault(sample.sample_id, sample)
    return [picked[sample_id] for sample_id in sorted(picked)], len(ids)


def _examples(samples: list[Sample], renderer: Renderer, on_error: str, skipped: list[SkippedRecord]):
    """Render samples into training examples; labels are the token ids of response tokens, else -100."""
    examples, kept = [], []
    for sample in samples:
        try:
            rendered = renderer.render(sample.messages)
        except RenderError as error:
            if on_error == "stop":
                raise InputError(sample.path, sample.line, None, str(error),
                                 "fix the record, or pass --on-error skip to skip it") from error
            skipped.append(SkippedRecord(sample.path, sample.line, None, str(error)))
            continue
        labels = [t if part == RESPONSE else IGNORE_INDEX for t, part in zip(rendered.input_ids, rendered.parts)]
        examples.append(_Example(rendered.input_ids, labels, rendered.truncated))
        kept.append(sample)
    if not examples:
        raise InputError(samples[0].path, None, None, f"none of the {len(samples)} picked samples could be rendered",
                         "fix the records or raise --fraction")
    return examples, kept


def _lora_model(loaded: LoadedModel, settings: WarmupSettings):
    """Wrap the base model with trainable LoRA adapters; every base weight stays frozen."""
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(settings.seed)  # LoRA A matrices start random
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=list(TARGET_MODULES), task_type=TaskType.CAUSAL_LM,
    )
    loaded.use_attention("sdpa")  # training needs no attention maps
    with quiet_peft():
        peft_model = get_peft_model(loaded.model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA rank %d, alpha %g, dropout %g on %s: %.2f M trainable of %.1f M parameters",
             settings.rank, settings.alpha, settings.dropout, ", ".join(TARGET_MODULES), trainable / 1e6, total / 1e6)
    return peft_model


def _train(peft_model, examples: list[_Example], settings: WarmupSettings, pad_id: int, progress: bool) -> list[float]:
    """Run the optimizer steps and return the loss of each step."""
    from transformers import get_linear_schedule_with_warmup

    batches = plan_batches([len(e.input_ids) for e in examples], settings.batch_tokens)
    steps_per_epoch = math.ceil(len(batches) / settings.accumulation_steps)
    total_steps = min(steps_per_epoch * settings.epochs, settings.max_steps or math.inf)
    # The schedule's first step runs at learning rate 0, so rounding down keeps a run of a few
    # steps from spending them all in warmup (the Trainer of transformers 5.25 rounds up).
    warmup_steps = math.floor(settings.warmup_ratio * total_steps)
    parameters = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    log.info("%d optimizer steps (%d warmup) over %d epochs of %d batches of at most %d padded tokens",
             total_steps, warmup_steps, settings.epochs, len(batches), settings.batch_tokens)

    losses: list[float] = []
    peft_model.train()
    with tqdm(total=total_steps, unit="step", desc="warmup", disable=not progress) as bar:
        for group in itertools.islice(_step_groups(batches, settings), total_steps):
            loss = _step(peft_model, examples, group, pad_id, parameters)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
    peft_model.eval()
    return losses


def _step_groups(batches: list[list[int]], settings: WarmupSettings):
    """Yield the batches of each optimizer step: every epoch visits the batches in a new seeded order."""
    order_rng = random.Random(settings.seed)
    for _ in range(settings.epochs):
        order = batches[:]
        order_rng.shuffle(order)
        for first in range(0, len(order), settings.accumulation_steps):
            yield order[first:first + settings.accumulation_steps]


def _step(peft_model, examples: list[_Example], group: list[list[int]], pad_id: int, parameters) -> float:
    """Accumulate the gradients of a group of batches and return their mean loss."""
    total = 0.0
    for batch in group:
        loss = _batch_loss(peft_model, [examples[i] for i in batch], pad_id) / len(group)
        loss.backward()
        total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
    return total


def _batch_loss(peft_model, batch: list[_Example], pad_id: int) -> torch.Tensor:
    """Return the mean next-token cross-entropy over the batch's response tokens."""
    causal_lm = peft_model.get_base_model()
    device = next(causal_lm.parameters()).device
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.as_tensor(example.input_ids)
        labels[row, :n] = torch.as_tensor(example.labels)
        attention_mask[row, :n] = 1

    hidden = causal_lm.get_decoder()(input_ids=input_ids.to(device),
                                     attention_mask=attention_mask.to(device)).last_hidden_state  # (B, T, D)
    # Position t predicts token t + 1; only positions whose next token is a response token count,
    # so the LM head runs on those positions alone.
    targets = labels[:, 1:].to(device)  # (B, T - 1)
    keep = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep]).float()  # (response tokens, vocab)
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def _record(summary: WarmupSummary, identity: dict, paths: list[str], arguments: dict) -> dict:
    return {
        "trimdb_version": __version__,
        "arguments": arguments,
        "settings": summary.settings.to_dict(),
        "lora": {"target_modules": list(TARGET_MODULES), "task_type": "CAUSAL_LM"},
        "base_model": identity,
        "pool": {"paths": paths, "n_samples": summary.n_pool},
        "sample_ids": summary.sample_ids,
        "n_tokens": summary.n_tokens,
        "n_response_tokens": summary.n_response_tokens,
        "n_truncated": summary.n_truncated,
        "n_skipped": len(summary.skipped),
        "losses": summary.losses,
        "seconds": round(summary.seconds, 3),
    }


def _save(peft_model, out_dir: Path, record: dict) -> None:
    """Write the adapter and the run record into a temporary folder beside ``out_dir``, then rename it."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_dir.parent / f".{out_dir.name}.{os.getpid()}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)  # left over by a killed run of this process id
    temporary.mkdir()
    try:
        peft_model.save_pretrained(str(temporary))
        (temporary / WARMUP_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _check_out_dir(out_dir)
        temporary.rename(out_dir)  # an empty out_dir is replaced; rename(2) rejects a non-empty one
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
