"""The `less` baseline of `trimdb query --method`: LoRA gradient features, projected, matched by cosine.

LESS (Xia et al., "LESS: Selecting Influential Data for Targeted Instruction Tuning",
arXiv:2402.04333, 2024) scores a pool sample by how well its loss gradient aligns with the
gradients of the target samples. Stages, in order:

1. attach a fresh LoRA (rank ``lora_rank`` on the attention projections) to the loaded model;
   a model loaded with ``--adapter`` has that adapter merged already, and the fresh LoRA sits on top;
2. render each target sample, then each pool sample re-read from its stored record, and compute
   the gradient of its mean response-token loss with respect to the LoRA parameters, one sample
   per backward pass (batch size 1, as LESS does);
3. project each flattened gradient to ``projection_dim`` dimensions with a seeded Rademacher
   matrix (entries +-1/sqrt(k)) and scale it to unit length;
4. score a pool sample by its maximum cosine over the target samples of a task, and store the
   mean cosine as ``mean_part``.

Unlike TRIM and the other baselines, LESS reads nothing from the stored token vectors: every
pool sample needs a forward and a backward pass for every query, which is its cost. The run
stores the seconds and an estimate of the FLOPs in the ``cost`` entry of the run's stats.

Differences from LESS:

- one model state: LESS sums the scores of the checkpoints of its 4 warmup epochs, weighted by
  their learning rates, and `trimdb warmup` saves only the final adapter;
- plain gradients on both sides: LESS preconditions pool gradients with the Adam moments of each
  checkpoint, and `trimdb warmup` saves no optimizer states;
- no subtasks: LESS averages the cosines over the target samples of each subtask (57 for MMLU)
  and takes the maximum over subtasks. A trimdb task has no subtasks, so each target sample
  counts as one, and ``mean_part`` is what LESS computes for a task of a single subtask;
- a fresh LoRA instead of the warmup's trained one, whose weights ``--adapter`` has merged into
  the model. A fresh LoRA starts with B = 0, so every A gradient is exactly 0 and the features
  use the B gradients only. Each B gradient is the full weight gradient times the random A.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from trimdb.baselines import BaselinePool, BaselineScores, scope_token_counts
from trimdb.errors import InputError, RenderError, TrimdbError
from trimdb.models import quiet_peft
from trimdb.records import Message, Sample, detect_format, to_messages
from trimdb.render import RESPONSE, Renderer, RenderedSample
from trimdb.scoring import SampleScores
from trimdb.warmup import IGNORE_INDEX, TARGET_MODULES

log = logging.getLogger(__name__)

# LESS projects LoRA gradients to 8,192 dimensions for its main results.
DEFAULT_PROJECTION_DIM = 8192
# Rank of the fresh LoRA. The cosines do not depend on its alpha, which scales every B gradient alike.
DEFAULT_LORA_RANK = 8
# Rows of the projection matrix generated at a time: 2,048 x 8,192 float32 is 64 MiB. The matrix
# is seeded per chunk, so it depends on this constant, the seed, k and the number of parameters.
PROJECTION_CHUNK_ROWS = 2048
# Memory for unprojected gradients. Each flush of the buffer regenerates the whole projection
# matrix, so a larger buffer spreads that cost over more samples.
DEFAULT_BUFFER_MB = 512
# Stored records fetched per query while re-reading the pool.
RECORD_FETCH = 1000


@dataclass
class LessScores:
    """Cosines of the pool samples that rendered, in the order the pool iterator yielded them."""

    keys: np.ndarray  # (m,) the keys the pool iterator yielded with each sample
    max_cosine: dict[str, np.ndarray]  # task -> (m,) maximum cosine over the task's target samples
    mean_cosine: dict[str, np.ndarray]  # task -> (m,) mean cosine over the task's target samples
    n_target_tokens: dict[str, int]  # task -> response tokens of its target samples
    stats: dict = field(default_factory=dict)


class GradientFeaturizer:
    """LoRA gradient features of rendered samples; ``with`` attaches the LoRA and removes it on exit.

    ``features`` returns unit vectors (n, k); ``gradients`` returns the unprojected ones (n, P).
    """

    def __init__(self, loaded, *, projection_dim: int = DEFAULT_PROJECTION_DIM, seed: int = 0,
                 lora_rank: int = DEFAULT_LORA_RANK):
        if projection_dim < 1 or lora_rank < 1:
            raise ValueError(f"projection_dim and lora_rank must be at least 1, got {projection_dim} and {lora_rank}")
        self.loaded = loaded
        self.projection_dim = projection_dim
        self.seed = seed
        self.lora_rank = lora_rank
        self.peft_model = None
        self.parameters: list[torch.nn.Parameter] = []

    @property
    def n_parameters(self) -> int:
        """Number of gradient entries per sample, P."""
        return sum(p.numel() for p in self.parameters)

    def __enter__(self) -> "GradientFeaturizer":
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(r=self.lora_rank, lora_alpha=2 * self.lora_rank, lora_dropout=0.0,
                            target_modules=list(TARGET_MODULES), task_type=TaskType.CAUSAL_LM)
        self.loaded.use_attention("sdpa")  # gradients need no attention maps
        with torch.random.fork_rng(devices=[]), quiet_peft():
            torch.manual_seed(self.seed)  # the LoRA A matrices start random
            self.peft_model = get_peft_model(self.loaded.model, config)
        self.peft_model.eval()
        self.parameters = []
        for name, parameter in self.peft_model.named_parameters():
            is_b = ".lora_B." in name
            parameter.requires_grad_(is_b)  # A gradients are 0 while B = 0, so backward skips them
            if is_b:
                self.parameters.append(parameter)
        return self

    def __exit__(self, *exc) -> None:
        self.peft_model.unload()  # removes the LoRA layers in place and leaves loaded.model as it was
        self.peft_model, self.parameters = None, []

    def gradient(self, rendered: RenderedSample, out: torch.Tensor) -> None:
        """Write the flattened LoRA gradient (P,) of one sample's mean response-token loss into ``out``."""
        for parameter in self.parameters:
            parameter.grad = None
        loss = response_loss(self.peft_model.get_base_model(), rendered)
        loss.backward()
        offset = 0
        for parameter in self.parameters:
            n = parameter.numel()
            out[offset:offset + n] = parameter.grad.reshape(-1)
            offset += n

    def gradients(self, samples: Sequence[RenderedSample]) -> torch.Tensor:
        """Return the unprojected gradients (n, P) of rendered samples, float32."""
        out = torch.empty((len(samples), self.n_parameters), dtype=torch.float32)
        for row, rendered in enumerate(samples):
            self.gradient(rendered, out[row])
        return out

    def project(self, gradients: torch.Tensor) -> np.ndarray:
        """Project gradients (n, P) with the seeded Rademacher matrix and return unit rows (n, k)."""
        projected = rademacher_project(gradients, self.projection_dim, self.seed)
        return unit_rows(projected.numpy())

    def features(self, samples: Sequence[RenderedSample]) -> np.ndarray:
        """Return the unit projected gradient features (n, k) of rendered samples."""
        return self.project(self.gradients(samples))


def response_loss(causal_lm, rendered: RenderedSample) -> torch.Tensor:
    """Return the mean next-token cross-entropy over the response tokens of one rendered sample."""
    device = next(causal_lm.parameters()).device
    input_ids = torch.as_tensor([rendered.input_ids], dtype=torch.long, device=device)  # (1, T)
    labels = torch.as_tensor([t if part == RESPONSE else IGNORE_INDEX
                              for t, part in zip(rendered.input_ids, rendered.parts)], device=device)
    hidden = causal_lm.get_decoder()(input_ids=input_ids).last_hidden_state[0]  # (T, D)
    # Position t predicts token t + 1, so the LM head runs only on positions before a response token.
    targets = labels[1:]  # (T - 1,)
    keep = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[:-1][keep]).float()  # (response tokens, vocab)
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def rademacher_project(gradients: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Return gradients (n, P) times a seeded Rademacher matrix R (P, dim) with entries +-1/sqrt(dim).

    R is generated in chunks of PROJECTION_CHUNK_ROWS rows, each from its own seeded generator, so
    no more than one chunk (PROJECTION_CHUNK_ROWS x dim) is in memory and every call builds the same R.
    """
    gradients = gradients.to(torch.float32)
    n, n_parameters = gradients.shape
    out = torch.zeros((n, dim), dtype=torch.float32)
    for chunk, first in enumerate(range(0, n_parameters, PROJECTION_CHUNK_ROWS)):
        block = gradients[:, first:first + PROJECTION_CHUNK_ROWS]  # (n, rows)
        generator = torch.Generator().manual_seed(chunk_seed(seed, chunk))
        bits = torch.randint(0, 2, (block.shape[1], dim), generator=generator, dtype=torch.float32)  # (rows, dim)
        # block @ (2 bits - 1) without building the +-1 matrix.
        out += 2 * (block @ bits) - block.sum(dim=1, keepdim=True)
    return out / math.sqrt(dim)


def chunk_seed(seed: int, chunk: int) -> int:
    """Return the generator seed of one projection chunk, derived from ``seed`` and the chunk index."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1, dtype=np.uint64)[0])


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Scale each row (n, k) to unit length; a zero row stays zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


# Scoring ------------------------------------------------------------------------------------


def less_scores(
    loaded,
    renderer: Renderer,
    pool_samples: Iterable[tuple[int, Sequence[Message]]],
    target_samples: Mapping[str, Sequence[Sample]],
    *,
    projection_dim: int = DEFAULT_PROJECTION_DIM,
    seed: int = 0,
    lora_rank: int = DEFAULT_LORA_RANK,
    buffer_mb: float = DEFAULT_BUFFER_MB,
    n_pool: int | None = None,
    progress: bool = True,
) -> LessScores:
    """Score pool samples, given as (key, messages), against each task's target samples with LESS.

    Pool gradients are computed once for all tasks. A pool sample that does not render is left
    out and counted; a target sample that does not render raises InputError. ``n_pool`` sizes the
    progress bar only.
    """
    empty = [name for name, samples in target_samples.items() if not samples]
    if not target_samples or empty:
        raise ValueError(f"every task needs at least one target sample; tasks without one: {empty or 'all'}")
    started = time.perf_counter()
    with GradientFeaturizer(loaded, projection_dim=projection_dim, seed=seed, lora_rank=lora_rank) as featurizer:
        targets = [(name, _render_target(renderer, sample)) for name, samples in target_samples.items()
                   for sample in samples]
        n_parameters = featurizer.n_parameters  # read inside the block, because exit detaches the LoRA
        rows = max(1, int(buffer_mb * 2**20) // (4 * n_parameters))
        log.info("less: LoRA rank %d, %d gradient entries per sample projected to %d; %d samples per projection "
                 "pass", lora_rank, n_parameters, projection_dim, rows)
        run = _LessRun(featurizer, renderer, targets, rows)
        with tqdm(total=len(targets) + (n_pool or 0), unit="sample", desc="less", disable=not progress) as bar:
            run.stream(pool_samples, bar)
    scores = run.finish(list(target_samples))
    scores.stats |= _cost(loaded, run, n_parameters, projection_dim, time.perf_counter() - started)
    scores.stats |= {"lora_rank": lora_rank, "projection_dim": projection_dim, "seed": seed}
    log.info("less: %d pool samples (%d not rendered) in %.1f s: %.1f s gradients, %.1f s projection, "
             "about %.3g FLOPs", len(scores.keys), run.n_unrendered, scores.stats["seconds"],
             run.gradient_seconds, run.projection_seconds, scores.stats["flops"])
    return scores


def _render_target(renderer: Renderer, sample: Sample) -> RenderedSample:
    try:
        return renderer.render(sample.messages)
    except RenderError as error:
        raise InputError(sample.path, sample.line, None, str(error)) from error


class _LessRun:
    """The gradient buffer of one less_scores call: targets first, then pool samples, projected per flush."""

    def __init__(self, featurizer: GradientFeaturizer, renderer: Renderer,
                 targets: list[tuple[str, RenderedSample]], rows: int):
        self.featurizer, self.renderer = featurizer, renderer
        self.targets = targets
        self.buffer = torch.empty((rows, featurizer.n_parameters), dtype=torch.float32)  # (rows, P)
        self.pending: list[int | None] = []  # pool key per buffered row; None for a target row
        self.target_features: list[np.ndarray] = []
        self.keys: list[int] = []
        self.cosines: list[np.ndarray] = []  # (m, n targets) per flush
        self.n_tokens = self.n_pool_tokens = self.n_unrendered = 0
        self.gradient_seconds = self.projection_seconds = 0.0
        self.n_projected = 0

    def stream(self, pool_samples: Iterable[tuple[int, Sequence[Message]]], bar) -> None:
        for _, rendered in self.targets:
            self._add(None, rendered)
            bar.update(1)
        for key, messages in pool_samples:
            try:
                rendered = self.renderer.render(messages)
            except RenderError as error:
                self.n_unrendered += 1
                log.warning("less: pool sample %s does not render and gets no score: %s", key, error)
            else:
                self._add(int(key), rendered)
                self.n_pool_tokens += len(rendered.input_ids)
            bar.update(1)
        self._flush()

    def _add(self, key: int | None, rendered: RenderedSample) -> None:
        started = time.perf_counter()
        self.featurizer.gradient(rendered, self.buffer[len(self.pending)])
        self.gradient_seconds += time.perf_counter() - started
        self.n_tokens += len(rendered.input_ids)
        self.pending.append(key)
        if len(self.pending) == len(self.buffer):
            self._flush()

    def _flush(self) -> None:
        """Project the buffered gradients; targets precede every pool row, so their features are ready."""
        if not self.pending:
            return
        started = time.perf_counter()
        features = self.featurizer.project(self.buffer[:len(self.pending)])  # (rows, k)
        self.projection_seconds += time.perf_counter() - started
        self.n_projected += len(self.pending)
        is_target = np.array([key is None for key in self.pending])
        self.target_features += list(features[is_target])
        if (~is_target).any():
            self.keys += [key for key in self.pending if key is not None]
            self.cosines.append(features[~is_target] @ np.stack(self.target_features).T)  # (m, n targets)
        self.pending = []

    def finish(self, tasks: list[str]) -> LessScores:
        n_targets = len(self.targets)
        cosines = np.concatenate(self.cosines) if self.cosines else np.zeros((0, n_targets), dtype=np.float32)
        names = np.array([name for name, _ in self.targets])
        scores = LessScores(np.asarray(self.keys, dtype=np.int64), {}, {}, {})
        for task in tasks:
            columns = cosines[:, names == task].astype(np.float64)  # (m, task's targets)
            scores.max_cosine[task] = columns.max(axis=1)
            scores.mean_cosine[task] = columns.mean(axis=1)
            scores.n_target_tokens[task] = sum(
                rendered.parts.count(RESPONSE) for name, rendered in self.targets if name == task)
        scores.stats = {"n_pool_samples": len(self.keys), "n_unrendered": self.n_unrendered,
                        "n_target_samples": n_targets, "n_tokens": self.n_tokens, "n_pool_tokens": self.n_pool_tokens}
        return scores


def _cost(loaded, run: _LessRun, n_parameters: int, projection_dim: int, seconds: float) -> dict:
    """Return the seconds and estimated FLOPs of a run.

    The estimate counts about 2 N FLOPs per token for a forward pass of a model with N
    parameters, and 3 forward passes for a forward and a backward pass, so 6 N per token. It
    ignores attention FLOPs, and the backward pass here skips the weight gradients of the frozen
    base model (about a third of the 6 N). The projection costs 2 P k per sample.
    """
    n_model = sum(p.numel() for p in loaded.model.parameters())
    gradient_flops = 6 * n_model * run.n_tokens
    projection_flops = 2 * n_parameters * projection_dim * run.n_projected
    return {
        "seconds": round(seconds, 3),
        "seconds_gradients": round(run.gradient_seconds, 3),
        "seconds_projection": round(run.projection_seconds, 3),
        "flops": float(gradient_flops + projection_flops),
        "flops_gradients": float(gradient_flops),
        "flops_projection": float(projection_flops),
        "n_model_parameters": int(n_model),
        "n_lora_gradient_entries": int(n_parameters),
    }


# The query's pool ---------------------------------------------------------------------------


def iter_stored_messages(pool: BaselinePool, eligible: np.ndarray, counts: dict | None = None
                         ) -> Iterator[tuple[int, tuple[Message, ...]]]:
    """Yield (slot, messages) of each eligible sample, converted from its stored original record.

    The format is the index run's --format when it had one, else detected from the record. A record
    that no longer converts is skipped, logged and counted in ``counts["n_unconverted"]``.
    """
    run_formats = dict(pool.store.query(
        "SELECT run_id, json_extract_string(arguments, '$.format') FROM runs WHERE kind = 'index'").fetchall())
    cursor = pool.store.query("SELECT sample_key, run_id, path, line, record FROM samples ORDER BY sample_key")
    while rows := cursor.fetchmany(RECORD_FETCH):
        slots = np.searchsorted(pool.sample_keys, np.asarray([row[0] for row in rows], dtype=np.int64))
        for slot, (key, run_id, path, line, record) in zip(slots, rows):
            if not eligible[slot]:
                continue
            messages = _stored_messages(json.loads(record), run_formats.get(run_id), path, line)
            if messages is None:
                log.warning("less: the stored record of sample %s (%s:%s) no longer converts to messages; "
                            "it gets no score", key, path, line)
                if counts is not None:
                    counts["n_unconverted"] = counts.get("n_unconverted", 0) + 1
                continue
            yield int(slot), messages


def _stored_messages(record, index_format: str | None, path: str, line: int | None):
    if not isinstance(record, dict):
        return None
    format = index_format or detect_format(record)
    if format is None:
        return None
    try:
        return to_messages(record, format, path=path, line=line)
    except TrimdbError:
        return None


def score_less(pool: BaselinePool, targets: dict[str, list[Sample]], encoder, *, seed: int = 0,
               projection_dim: int = DEFAULT_PROJECTION_DIM, lora_rank: int = DEFAULT_LORA_RANK,
               progress: bool = True) -> tuple[dict[str, BaselineScores], dict]:
    """Score the pool's eligible samples with LESS; return per-task scores and the run's cost stats.

    ``encoder`` is the index's (LoadedModel, Renderer). As for the other baselines, a sample is
    eligible when ``--where`` keeps it and it has a stored token in ``--scope``. The gradient
    always comes from the response-token loss, whatever the scope.
    """
    loaded, renderer = encoder
    counts = scope_token_counts(pool)
    eligible = pool.allowed & (counts > 0)
    log.info("less: %d of %d samples have tokens in scope and pass --where", int(eligible.sum()), len(counts))
    skipped: dict[str, int] = {}
    scored = less_scores(loaded, renderer, iter_stored_messages(pool, eligible, skipped), targets,
                         projection_dim=projection_dim, seed=seed, lora_rank=lora_rank,
                         n_pool=int(eligible.sum()), progress=progress)
    results = {}
    for task in targets:
        score, mean_part = np.full(len(counts), np.nan), np.full(len(counts), np.nan)
        score[scored.keys], mean_part[scored.keys] = scored.max_cosine[task], scored.mean_cosine[task]
        task_scores = SampleScores(score, mean_part, score.copy(), np.zeros(len(counts)), counts.copy())
        results[task] = BaselineScores(task_scores, scored.n_target_tokens[task])
    return results, scored.stats | {"n_unconverted": skipped.get("n_unconverted", 0)}
