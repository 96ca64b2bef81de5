"""Baseline selection methods behind `trimdb query --method`: random, BM25 and embedding.

Each method returns one ``SampleScores`` per target task over the pool's sample slots, so
ranking, budget, deduplication, the combined coreset and ``--where`` are shared with TRIM
(trimdb.query). Every method scores the same samples: those that ``--where`` keeps and that
have at least one stored token in ``--scope``.

- ``random``: a uniform draw per sample from a numpy Generator seeded by ``--seed`` and the
  task name, so a task's coreset does not depend on the other tasks of the run.
- ``bm25``: BM25 (bm25s, k1 = 1.5, b = 0.75) over the pool's text, each target sample used as
  one query. The score is the maximum over the target samples; ``mean_part`` is their mean.
- ``embedding``: representation-based selection (RDS): a sample is the normalized mean of its
  unit final hidden states. Pool means come from the stored token vectors,
  with no forward pass; target means need one forward pass over the target samples. The score
  is the maximum cosine over the target samples; ``mean_part`` is the mean cosine.

The ``scores`` table columns keep their meaning where one exists: ``n_tokens`` is the number of
stored in-scope tokens of the sample, ``unseen_share`` is 0, and for ``random`` both
``mean_part`` and ``max_part`` equal the score.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import bm25s
import numpy as np
from bm25s.tokenization import Tokenizer
from tqdm.auto import tqdm

from trimdb.errors import InputError, RenderError, SettingsError, StorageError, TrimdbError
from trimdb.forward import encode
from trimdb.records import Sample, detect_format, read_corpus, to_messages
from trimdb.render import PROMPT, RESPONSE
from trimdb.scoring import SampleScores
from trimdb.store import Store

log = logging.getLogger(__name__)

# Token vectors read per chunk by the embedding pool pass: 65,536 x 576 float32 is 150 MB.
EMBEDDING_CHUNK = 65_536
# Sample records fetched per chunk by the BM25 pass.
BM25_FETCH = 10_000
# Message roles whose text BM25 reads for each token part of --scope.
PART_ROLES = {PROMPT: ("system", "user"), RESPONSE: ("assistant",)}


@dataclass
class BaselinePool:
    """The indexed samples a baseline scores: slots in ``sample_keys`` order, and which ones count.

    ``allowed`` (N,) marks the samples that ``--where`` keeps; ``parts`` are the token parts of
    ``--scope``.
    """

    store: Store
    sample_keys: np.ndarray
    allowed: np.ndarray
    parts: tuple[int, ...]


@dataclass
class BaselineScores:
    """One task's scores and the number of target tokens (or BM25 query terms) the method read."""

    scores: SampleScores
    n_target_tokens: int


def read_targets(name: str, path: str | Path, format: str | None) -> list[Sample]:
    """Read a task's target samples; raise InputError when the file has none."""
    samples = list(read_corpus([path], format=format, source=name))
    if not samples:
        raise InputError(str(path), None, None, "target file has no records", "give 5 to 10 samples of the target task")
    return samples


def score_baseline(method: str, pool: BaselinePool, targets: dict[str, list[Sample]], *, seed: int = 0,
                   encoder=None, progress: bool = True) -> dict[str, BaselineScores]:
    """Score every task with ``method``; ``encoder`` is (LoadedModel, Renderer), needed by embedding only."""
    counts = scope_token_counts(pool)
    eligible = pool.allowed & (counts > 0)
    log.info("%s: %d of %d samples have tokens in scope and pass --where", method, int(eligible.sum()), len(counts))
    if method == "random":
        return {name: BaselineScores(random_scores(counts, eligible, seed, name), 0) for name in targets}
    if method == "bm25":
        return bm25_scores(pool, counts, eligible, targets, progress)
    if method == "embedding":
        if encoder is None:
            raise SettingsError("the embedding method needs the index's model to embed the target samples")
        return embedding_scores(pool, eligible, targets, encoder, progress)
    raise SettingsError(f"unknown baseline method {method!r}: expected random, bm25 or embedding")


def scope_token_counts(pool: BaselinePool) -> np.ndarray:
    """Return the number of stored tokens in scope per sample slot (N,)."""
    placeholders = ", ".join("?" for _ in pool.parts)
    rows = pool.store.query(
        f"SELECT sample_key, count(*) AS n FROM tokens WHERE part IN ({placeholders}) GROUP BY sample_key",
        list(pool.parts)).fetchnumpy()
    counts = np.zeros(len(pool.sample_keys), dtype=np.int64)
    counts[np.searchsorted(pool.sample_keys, np.asarray(rows["sample_key"], dtype=np.int64))] = rows["n"]
    return counts


def _scores_from(score: np.ndarray, mean_part: np.ndarray, counts: np.ndarray) -> SampleScores:
    """Wrap per-slot scores; slots with a NaN score stay unscored."""
    return SampleScores(score, mean_part, score.copy(), np.zeros(len(score)), counts.copy())


# Random ------------------------------------------------------------------------------------


def random_scores(counts: np.ndarray, eligible: np.ndarray, seed: int, task: str) -> SampleScores:
    """Draw one uniform score in [0, 1) per sample slot from a Generator seeded by ``seed`` and ``task``.

    Every slot draws, eligible or not, so ``--where`` does not change a sample's score.
    """
    if seed < 0:
        raise SettingsError(f"the random seed must be a non-negative integer, got {seed}")
    task_entropy = int.from_bytes(hashlib.sha256(task.encode("utf-8")).digest()[:8], "little")
    generator = np.random.default_rng([seed, task_entropy])
    score = np.where(eligible, generator.random(len(counts)), np.nan)
    return _scores_from(score, score.copy(), counts)


# BM25 --------------------------------------------------------------------------------------


def bm25_scores(pool: BaselinePool, counts: np.ndarray, eligible: np.ndarray,
                targets: dict[str, list[Sample]], progress: bool) -> dict[str, BaselineScores]:
    """Score eligible samples by BM25 against each target sample; return max and mean over targets.

    NOTE: the BM25 index lives in memory. By estimate, building it peaks at about 24 bytes per
    word and 100 bytes per sample (int32 token ids, then bm25s's float32 scores and int32
    indices), so 1M samples of 300 words need about 7 GB.
    """
    roles = {role for part in pool.parts for role in PART_ROLES[part]}
    tokenizer = Tokenizer(lower=True, stopwords="en")
    slots, documents = _tokenize_pool(pool, eligible, roles, tokenizer, progress)
    if not documents:
        empty = np.full(len(counts), np.nan)
        return {name: BaselineScores(_scores_from(empty, empty.copy(), counts), 0) for name in targets}
    retriever = bm25s.BM25(k1=1.5, b=0.75)
    retriever.index((documents, tokenizer.word_to_id), show_progress=False)

    empty_id = tokenizer.word_to_id.get("")
    results = {}
    for name, samples in targets.items():
        texts = [sample_text(sample.messages, roles) for sample in samples]
        queries = [[i for i in ids if i != empty_id] for ids in tokenizer.streaming_tokenize(texts, update_vocab=False)]
        if not any(queries):
            log.warning("task %s: no word of the target samples occurs in the pool, so every BM25 score is 0", name)
        per_target = np.stack([retriever.get_scores_from_ids(query).astype(np.float64) for query in queries])
        score, mean_part = np.full(len(counts), np.nan), np.full(len(counts), np.nan)
        score[slots], mean_part[slots] = per_target.max(axis=0), per_target.mean(axis=0)
        results[name] = BaselineScores(_scores_from(score, mean_part, counts), sum(map(len, queries)))
        log.info("task %s: %d targets, %d BM25 query terms", name, len(samples), results[name].n_target_tokens)
    return results


def _tokenize_pool(pool: BaselinePool, eligible: np.ndarray, roles: set[str], tokenizer, progress: bool):
    """Return the slots (n,) of eligible samples and their BM25 token ids, read in chunks of records."""
    run_formats = dict(pool.store.query(
        "SELECT run_id, json_extract_string(arguments, '$.format') FROM runs WHERE kind = 'index'").fetchall())
    cursor = pool.store.query("SELECT sample_key, run_id, path, line, record FROM samples ORDER BY sample_key")
    slots, documents, n_fallback = [], [], 0
    bar = tqdm(total=int(eligible.sum()), unit="sample", desc="bm25", disable=not progress)
    while rows := cursor.fetchmany(BM25_FETCH):
        keys = np.asarray([row[0] for row in rows], dtype=np.int64)
        chunk_slots = np.searchsorted(pool.sample_keys, keys)
        texts = []
        for slot, (_, run_id, path, line, record) in zip(chunk_slots, rows):
            if not eligible[slot]:
                continue
            text, converted = record_text(json.loads(record), run_formats.get(run_id), roles, path, line)
            n_fallback += not converted
            slots.append(slot)
            texts.append(text)
        documents += [np.asarray(ids, dtype=np.int32) for ids in tokenizer.streaming_tokenize(texts)]
        bar.update(len(texts))
    bar.close()
    if n_fallback:
        log.warning("bm25: %d records matched no known format; their text is the record's string values joined",
                    n_fallback)
    return np.asarray(slots, dtype=np.int64), documents


def record_text(record, index_format: str | None, roles: set[str], path: str, line: int | None) -> tuple[str, bool]:
    """Return the text of a stored record's turns in ``roles``, and whether its format was known.

    The format is the index run's --format when it had one, else detected from the record. A
    record that does not convert becomes its string values joined by newlines.
    """
    if isinstance(record, dict):
        format = index_format or detect_format(record)
        if format is not None:
            try:
                return sample_text(to_messages(record, format, path=path, line=line), roles), True
            except TrimdbError:
                pass
    return "\n".join(_string_values(record)), False


def sample_text(messages, roles: set[str]) -> str:
    """Join the contents of the messages whose role is in ``roles`` with newlines."""
    return "\n".join(message.content for message in messages if message.role in roles)


def _string_values(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _string_values(item)
    elif isinstance(value, list):
        for item in value:
            yield from _string_values(item)


# Embedding ---------------------------------------------------------------------------------


def embedding_scores(pool: BaselinePool, eligible: np.ndarray, targets: dict[str, list[Sample]], encoder,
                     progress: bool) -> dict[str, BaselineScores]:
    """Score eligible samples by the cosine of their mean unit hidden state to each target sample's."""
    loaded, renderer = encoder
    loaded.use_attention("sdpa")
    embedded = {name: embed_targets(loaded, renderer, samples, pool.parts) for name, samples in targets.items()}
    stacked = np.concatenate([vectors for vectors, _ in embedded.values()])  # (sum T, D)
    bounds = np.cumsum([0] + [len(vectors) for vectors, _ in embedded.values()])
    n = len(pool.sample_keys)
    score, mean_part = np.full((len(targets), n), np.nan), np.full((len(targets), n), np.nan)
    counts = np.zeros(n, dtype=np.int64)

    total = sum(segment.n_vectors for segment in pool.store.segments())
    with tqdm(total=total, unit="tok", unit_scale=True, desc="embedding", disable=not progress) as bar:
        for slots, means, n_tokens in iter_sample_means(pool, eligible, on_chunk=bar.update):
            if counts[slots].any():
                raise StorageError(f"{pool.store.path}: the tokens of a sample are not consecutive; rebuild the index")
            counts[slots] = n_tokens
            cosines = means @ stacked.T  # (m, sum T)
            for task_index in range(len(targets)):
                part = cosines[:, bounds[task_index]:bounds[task_index + 1]]
                score[task_index, slots], mean_part[task_index, slots] = part.max(axis=1), part.mean(axis=1)
    return {name: BaselineScores(_scores_from(score[i], mean_part[i], counts), embedded[name][1])
            for i, name in enumerate(targets)}


def embed_targets(loaded, renderer, samples: list[Sample], parts: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """Return the unit mean hidden state (T, D) of each target sample's in-scope tokens, and the token count.

    Target samples with no token in scope are left out; InputError when none is left.
    """
    sequences, token_parts = [], []
    for sample in samples:
        try:
            rendered = renderer.render(sample.messages)
        except RenderError as error:
            raise InputError(sample.path, sample.line, None, str(error)) from error
        sequences.append(rendered.input_ids)
        token_parts.append(np.asarray(rendered.parts, dtype=np.int8))
    means, n_tokens = [], 0
    for index, states in encode(loaded.model, sequences, batch_tokens=max(map(len, sequences)) * 4,
                                pad_id=loaded.pad_id, saliency=None):
        in_scope = np.isin(token_parts[index], parts)
        if in_scope.any():
            means.append(_unit(states.hidden[in_scope].astype(np.float64).sum(axis=0)))
            n_tokens += int(in_scope.sum())
    if not means:
        raise InputError(samples[0].path, None, None, "no target token is in the chosen scope",
                         "use --scope all, or targets with content in that part")
    log.info("task %s: %d targets, %d in-scope tokens", samples[0].source, len(samples), n_tokens)
    return np.stack(means).astype(np.float32), n_tokens


def iter_sample_means(pool: BaselinePool, eligible: np.ndarray, chunk: int = EMBEDDING_CHUNK,
                      on_chunk=None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (slots (m,), unit mean vectors (m, D), token counts (m,)) of the eligible samples.

    The mean runs over a sample's stored in-scope token vectors. A sample's tokens have
    consecutive keys, so only the sample that straddles a chunk boundary is carried over.
    """
    carried: tuple[int, np.ndarray, int] | None = None
    for segment in pool.store.segments():
        for ids, vectors in pool.store.iter_vectors(segment, chunk):
            if on_chunk is not None:
                on_chunk(len(ids))
            slots, sums, counts = _chunk_sums(pool, eligible, ids, vectors)
            if len(slots) == 0:
                continue
            if carried is not None and carried[0] == slots[0]:
                sums[0] += carried[1]
                counts[0] += carried[2]
            elif carried is not None:
                yield np.array([carried[0]]), _unit(carried[1])[None, :], np.array([carried[2]])
            if len(slots) > 1:
                yield slots[:-1], _unit(sums[:-1]), counts[:-1]
            carried = (int(slots[-1]), sums[-1], int(counts[-1]))
    if carried is not None:
        yield np.array([carried[0]]), _unit(carried[1])[None, :], np.array([carried[2]])


def _chunk_sums(pool: BaselinePool, eligible: np.ndarray, ids: np.ndarray, vectors: np.ndarray):
    """Return the slots, vector sums (float64) and token counts of each run of one sample's tokens."""
    rows = pool.store.query(
        "SELECT token_key, sample_key, part FROM tokens WHERE token_key BETWEEN ? AND ? ORDER BY token_key",
        [int(ids[0]), int(ids[-1])]).fetchnumpy()
    if not np.array_equal(np.asarray(rows["token_key"], dtype=np.int64), ids):
        raise StorageError(
            f"{pool.store.path}: a vector segment contains token keys {ids[0]}..{ids[-1]} that do not match the "
            "tokens table; rebuild the index")
    slots = np.searchsorted(pool.sample_keys, np.asarray(rows["sample_key"], dtype=np.int64))
    keep = np.isin(np.asarray(rows["part"]), pool.parts) & eligible[slots]
    slots, vectors = slots[keep], vectors[keep]
    if len(slots) == 0:
        return slots, np.zeros((0, vectors.shape[1])), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]])
    sums = np.add.reduceat(vectors.astype(np.float64), starts, axis=0)  # (runs, D)
    counts = np.diff(np.r_[starts, len(slots)])
    return slots[starts], sums, counts


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Scale vectors (..., D) to unit length; a zero vector stays zero."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
