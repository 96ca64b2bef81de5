"""Coreset selection from ranked samples: budget split over tasks, round-robin, deduplication.

Each task keeps its own ranking. A combined coreset splits the total budget into per-task
quotas, then takes the tasks' rankings in round-robin order, one sample per task per round,
skipping samples already taken. A task whose ranking runs out passes its remaining quota to the
others, so the coreset is full whenever the pool allows.

Deduplication, when requested, keeps a candidate out of a selection when it is an exact duplicate
(same normalized text hash) or a near duplicate (cosine of mean-pooled token vectors at or above
a threshold) of a sample already kept. The next sample in the ranking takes its place.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from trimdb.errors import SettingsError

SPLIT_MODES = ("equal", "proportional")


def normalized_text_hash(messages) -> str:
    """Hash the message texts, lower-cased with whitespace collapsed, ignoring roles."""
    text = "\x1f".join(" ".join(message.content.lower().split()) for message in messages)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def parse_split(text: str, tasks: Sequence[str]) -> dict[str, float] | str:
    """Parse --split: "equal", "proportional", or "A=0.5,B=0.3" (weights, normalized later)."""
    if text in SPLIT_MODES:
        return text
    weights: dict[str, float] = {}
    for item in text.split(","):
        name, separator, value = item.partition("=")
        name = name.strip()
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not separator or weight < 0:
            raise SettingsError(
                f"invalid --split item {item!r}: use equal, proportional, or NAME=WEIGHT pairs such as gsm8k=0.6,mmlu=0.4"
            )
        if name not in tasks:
            raise SettingsError(f"--split names task {name!r}, which is not a --task; tasks: {', '.join(tasks)}")
        weights[name] = weight
    missing = [task for task in tasks if task not in weights]
    if missing:
        raise SettingsError(f"--split gives no weight for task(s) {', '.join(missing)}; give every task a weight")
    if sum(weights.values()) <= 0:
        raise SettingsError("--split weights must not all be 0")
    return weights


def split_budget(total: int, split: dict[str, float] | str, target_counts: dict[str, int]) -> dict[str, int]:
    """Split ``total`` samples into per-task quotas that sum to ``total`` (largest remainder)."""
    tasks = list(target_counts)
    if split == "equal":
        weights = {task: 1.0 for task in tasks}
    elif split == "proportional":
        weights = {task: float(target_counts[task]) for task in tasks}
    else:
        weights = dict(split)
    scale = total / sum(weights.values())
    exact = {task: weights[task] * scale for task in tasks}
    quotas = {task: math.floor(exact[task]) for task in tasks}
    by_remainder = sorted(tasks, key=lambda task: (-(exact[task] - quotas[task]), tasks.index(task)))
    for task in by_remainder[: total - sum(quotas.values())]:
        quotas[task] += 1
    return quotas


@dataclass
class Removal:
    """A sample kept out of a selection as a duplicate of an earlier pick."""

    index: int
    reason: str
    duplicate_of: int
    similarity: float | None = None


@dataclass
class Deduplicator:
    """Record of the samples kept so far, which checks whether a candidate duplicates one of them.

    ``text_hashes`` contains one normalized text hash per sample slot (None when unknown).
    ``embedding`` returns the unit mean-pooled vector of a slot; it is needed only when
    ``near_threshold`` is set.
    """

    text_hashes: Sequence[str | None] | None = None
    near_threshold: float | None = None
    embedding: Callable[[int], np.ndarray] | None = None
    kept_hashes: dict[str, int] = field(default_factory=dict)
    kept_indices: list[int] = field(default_factory=list)
    kept_vectors: list[np.ndarray] = field(default_factory=list)

    def check(self, index: int) -> Removal | None:
        if self.text_hashes is not None:
            text_hash = self.text_hashes[index]
            if text_hash is not None and text_hash in self.kept_hashes:
                return Removal(index, "exact", self.kept_hashes[text_hash])
        if self.near_threshold is not None and self.kept_vectors:
            similarities = np.stack(self.kept_vectors) @ self.embedding(index)
            best = int(np.argmax(similarities))
            if similarities[best] >= self.near_threshold:
                return Removal(index, "near", self.kept_indices[best], float(similarities[best]))
        return None

    def keep(self, index: int) -> None:
        if self.text_hashes is not None and self.text_hashes[index] is not None:
            self.kept_hashes.setdefault(self.text_hashes[index], index)
        if self.near_threshold is not None:
            self.kept_indices.append(index)
            self.kept_vectors.append(self.embedding(index))


def select_ranked(order: np.ndarray, quota: int, dedup: Deduplicator | None) -> tuple[list[int], list[Removal]]:
    """Take the first ``quota`` samples of a ranking, skipping duplicates when ``dedup`` is set."""
    chosen: list[int] = []
    removed: list[Removal] = []
    for index in order:
        if len(chosen) >= quota:
            break
        index = int(index)
        removal = dedup.check(index) if dedup is not None else None
        if removal is not None:
            removed.append(removal)
            continue
        chosen.append(index)
        if dedup is not None:
            dedup.keep(index)
    return chosen, removed


@dataclass
class CombinedPick:
    """One sample of a combined coreset and the task ranking it came from."""

    index: int
    task: str
    task_rank: int


def combine_rankings(
    rankings: dict[str, np.ndarray], quotas: dict[str, int], dedup: Deduplicator | None
) -> tuple[list[CombinedPick], list[Removal]]:
    """Take per-task rankings round-robin within their quotas, skipping samples already taken."""
    taken: set[int] = set()
    positions = {task: 0 for task in rankings}
    left = dict(quotas)
    picks: list[CombinedPick] = []
    removed: list[Removal] = []
    total = sum(quotas.values())
    while len(picks) < total:
        active = [task for task in rankings if positions[task] < len(rankings[task])]
        if not active:
            break
        # Tasks with quota left go first; when all are spent, exhausted tasks' quota is shared.
        turn = [task for task in active if left[task] > 0] or active
        for task in turn:
            pick = _next_pick(rankings[task], positions, task, taken, dedup, removed)
            if pick is None:
                continue
            picks.append(pick)
            left[task] -= 1
            if len(picks) >= total:
                break
    return picks, removed


def _next_pick(ranking, positions, task, taken, dedup, removed) -> CombinedPick | None:
    while positions[task] < len(ranking):
        index = int(ranking[positions[task]])
        positions[task] += 1
        if index in taken:
            continue
        removal = dedup.check(index) if dedup is not None else None
        if removal is not None:
            removed.append(removal)
            taken.add(index)
            continue
        taken.add(index)
        if dedup is not None:
            dedup.keep(index)
        return CombinedPick(index, task, positions[task])
    return None
