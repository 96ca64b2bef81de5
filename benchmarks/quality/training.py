"""Fine-tune the model on a coreset with LoRA and measure it on a held-out evaluation set.

Training reuses `trimdb warmup` (trimdb.warmup.warmup) with ``fraction=1``: every coreset sample
is trained on, the loss counts response tokens only, and every coreset gets the same settings.
Adapters are cached under a SHA-256 of the coreset's sample ids, the settings and the model, so a
rerun trains only what changed.

Metrics:
- held-out loss: the mean negative log-likelihood per response token (nats), pooled over all
  response tokens of the evaluation set;
- GSM8K accuracy: greedy decoding of at most ``max_new_tokens`` new tokens, and exact match of
  the last number of the output with the reference answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.quality.data import final_number
from trimdb.demo_data import write_jsonl
from trimdb.forward import plan_batches
from trimdb.models import WARMUP_RECORD, load_model
from trimdb.render import RESPONSE, Renderer
from trimdb.warmup import WarmupSettings, warmup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """LoRA fine-tune settings shared by every coreset of a benchmark run."""

    epochs: int = 2
    max_steps: int | None = 6
    learning_rate: float = 5e-4
    rank: int = 8
    alpha: float = 16.0
    batch_tokens: int = 2048
    max_length: int = 512
    dtype: str = "bfloat16"
    seed: int = 0

    def warmup_settings(self) -> WarmupSettings:
        """Return the trimdb warmup settings that train on every given sample with these settings."""
        return WarmupSettings(
            fraction=1.0, seed=self.seed, epochs=self.epochs, rank=self.rank, alpha=self.alpha,
            learning_rate=self.learning_rate, max_length=self.max_length, batch_tokens=self.batch_tokens,
            max_steps=self.max_steps, dtype=self.dtype,
        )


@dataclass
class FineTune:
    """One trained adapter: its folder, training seconds, steps and first and last loss."""

    adapter: Path
    seconds: float
    n_steps: int
    n_samples: int
    first_loss: float
    last_loss: float
    cached: bool


@dataclass
class Evaluation:
    """Held-out metrics of one model on one target task's evaluation set."""

    loss: float
    n_tokens: int
    accuracy: float | None = None
    n_accuracy: int = 0
    seconds: float = 0.0


def fine_tune(records: list[dict], folder: Path, settings: TrainSettings, model: str | None,
              progress: bool = False) -> FineTune:
    """Train a LoRA adapter on ``records`` with trimdb warmup, or reuse the cached one for the same inputs."""
    key = hashlib.sha256(json.dumps({
        "ids": sorted(r["id"] for r in records), "settings": asdict(settings), "model": model,
    }, sort_keys=True).encode()).hexdigest()[:16]
    adapter = folder / key
    if not (adapter / WARMUP_RECORD).exists():
        with tempfile.TemporaryDirectory(prefix="coreset-") as scratch:
            corpus = Path(scratch) / "coreset.jsonl"
            write_jsonl(corpus, records)
            warmup([corpus], adapter, model=model, settings=settings.warmup_settings(), progress=progress)
        cached = False
    else:
        cached = True
    record = json.loads((adapter / WARMUP_RECORD).read_text())
    losses = record["losses"]
    return FineTune(adapter, record["seconds"], len(losses), len(record["sample_ids"]), losses[0], losses[-1],
                    cached)


def evaluate(records: list[dict], model: str | None, adapter: Path | None, settings: TrainSettings,
             n_accuracy: int = 0, max_new_tokens: int = 96) -> Evaluation:
    """Load the model (with ``adapter`` merged) and return its held-out loss and, if asked, accuracy."""
    started = time.perf_counter()
    loaded = load_model(model, dtype=settings.dtype, adapter=adapter)
    loaded.use_attention("sdpa")
    renderer = Renderer(loaded.tokenizer, max_length=settings.max_length)
    loss, n_tokens = heldout_loss(loaded, renderer, records, settings.batch_tokens)
    result = Evaluation(loss, n_tokens)
    if n_accuracy > 0:
        subset = [r for r in records if r.get("answer") is not None][:n_accuracy]
        result.accuracy = exact_match_accuracy(loaded, subset, max_new_tokens)
        result.n_accuracy = len(subset)
    result.seconds = time.perf_counter() - started
    return result


def heldout_loss(loaded, renderer: Renderer, records: list[dict], batch_tokens: int) -> tuple[float, int]:
    """Return the mean NLL per response token over ``records`` and the number of response tokens."""
    rendered = [renderer.render(r["messages"]) for r in records]
    causal_lm = loaded.model
    device = next(causal_lm.parameters()).device
    total, count = 0.0, 0
    for batch in plan_batches([len(r.input_ids) for r in rendered], batch_tokens):
        width = max(len(rendered[i].input_ids) for i in batch)
        input_ids = torch.full((len(batch), width), loaded.pad_id, dtype=torch.long)
        is_response = torch.zeros((len(batch), width), dtype=torch.bool)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            sample = rendered[index]
            input_ids[row, :len(sample.input_ids)] = torch.as_tensor(sample.input_ids)
            is_response[row, :len(sample.parts)] = torch.as_tensor([p == RESPONSE for p in sample.parts])
            attention_mask[row, :len(sample.input_ids)] = 1
        with torch.inference_mode():
            hidden = causal_lm.get_decoder()(input_ids=input_ids.to(device),
                                             attention_mask=attention_mask.to(device)).last_hidden_state
            # Position t predicts token t + 1, so the positions before response tokens count.
            keep = is_response[:, 1:].to(device)  # (B, T - 1)
            logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
            targets = input_ids[:, 1:].to(device)[keep]
            total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += int(keep.sum())
    return (total / count if count else math.nan), count


def exact_match_accuracy(loaded, records: list[dict], max_new_tokens: int, batch_size: int = 8) -> float:
    """Return the share of records whose greedy answer ends in the reference number ``answer``."""
    tokenizer = loaded.tokenizer
    prompts = [tokenizer.apply_chat_template([m for m in r["messages"] if m["role"] != "assistant"],
                                             add_generation_prompt=True, tokenize=False) for r in records]
    correct = 0
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    try:
        for first in range(0, len(prompts), batch_size):
            chunk = prompts[first:first + batch_size]
            encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            device = next(loaded.model.parameters()).device
            with torch.inference_mode():
                output = loaded.model.generate(
                    **{k: v.to(device) for k, v in encoded.items()}, max_new_tokens=max_new_tokens,
                    do_sample=False, pad_token_id=loaded.pad_id)
            texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
            for text, record in zip(texts, records[first:first + batch_size]):
                correct += final_number(text) == record["answer"]
    finally:
        tokenizer.padding_side = side
    return correct / len(records) if records else math.nan
