"""Exact TRIM computed in memory, one sample at a time, as a reference for the indexed path.

This module shares only rendering (which tokens are in scope) with the fast path. It runs each
sample alone through the full model with ``output_attentions`` and ``output_hidden_states``,
computes saliency with per-position loops, and pools token scores in Python, so a bug in
batching, padding, storage or vectorized pooling shows up as a difference. It is slow: use it
on small pools to check an index.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from trimdb.render import PROMPT, RESPONSE, Renderer
from trimdb.settings import INVERSE_EPSILON, MIN_FINGERPRINT_NORM, ScoreSettings

SCOPE_PARTS = {"all": (PROMPT, RESPONSE), "response": (RESPONSE,), "prompt": (PROMPT,)}


def reference_scores(model, renderer: Renderer, pool: Sequence, targets: Sequence, settings: ScoreSettings) -> dict:
    """Return ``{sample_id: (score, mean_part, max_part, unseen_share, n_tokens)}`` for the pool."""
    allowed = SCOPE_PARTS[settings.scope]
    sums: dict[int, np.ndarray] = {}
    for target in targets:
        ids, parts, hidden, attentions = _run(model, renderer, target.messages)
        alpha = _saliency(attentions, parts, allowed, settings)
        for i, token in enumerate(ids):
            if i > 0 and parts[i] in allowed:
                sums[token] = sums.get(token, 0) + alpha[i] * hidden[i]
    fingerprints = {t: v / np.linalg.norm(v) for t, v in sums.items() if np.linalg.norm(v) >= MIN_FINGERPRINT_NORM}
    every_fingerprint = np.stack(list(fingerprints.values()))

    results = {}
    for sample in pool:
        ids, parts, hidden, _ = _run(model, renderer, sample.messages, attentions=False)
        token_scores, unseen = [], 0
        for i, token in enumerate(ids):
            if parts[i] not in allowed:
                continue
            if token in fingerprints:
                token_scores.append(float(hidden[i] @ fingerprints[token]))
            else:
                token_scores.append(settings.unseen_penalty * float((every_fingerprint @ hidden[i]).max()))
                unseen += 1
        if not token_scores:
            continue
        mean_part, max_part = sum(token_scores) / len(token_scores), max(token_scores)
        score = settings.mean_weight * mean_part + settings.max_weight * max_part
        results[sample.sample_id] = (score, mean_part, max_part, unseen / len(token_scores), len(token_scores))
    return results


def _run(model, renderer, messages, attentions: bool = True):
    rendered = renderer.render(messages)
    input_ids = torch.tensor([rendered.input_ids])
    with torch.inference_mode():
        output = model(input_ids=input_ids, output_attentions=attentions, output_hidden_states=True)
    final = output.hidden_states[-1][0].float()
    hidden = (final / final.norm(dim=-1, keepdim=True)).numpy().astype(np.float64)
    maps = [a[0].float().numpy().astype(np.float64) for a in output.attentions] if attentions else None
    return rendered.input_ids, rendered.parts, hidden, maps


def _saliency(attentions, parts, allowed, settings: ScoreSettings) -> np.ndarray:
    """Blend min-max normalized row and column saliency, averaged over the last L layers and all heads."""
    layers = attentions[-settings.saliency.layers:]
    n = len(parts)
    row, column = np.zeros(n), np.zeros(n)
    for layer in layers:
        for head in layer:
            for i in range(n):
                probs = head[i, : i + 1]
                probs = probs[probs > 0]
                entropy = float(-(probs * np.log(probs)).sum())
                if settings.saliency.row_saliency == "normalized":
                    row[i] += min(max(1 - entropy / math.log(i + 1), 0.0), 1.0) if i >= 1 else 0.0
                else:
                    row[i] += 1 / (entropy + INVERSE_EPSILON)
                column[i] += head[i:, i].sum() / (n - i)
    count = len(layers) * layers[0].shape[0]
    row, column = row / count, column / count

    scope = [i for i in range(1, n) if parts[i] in allowed]
    alpha = np.zeros(n)
    for values, weight in ((row, settings.saliency.row_weight), (column, settings.saliency.column_weight)):
        low, high = min(values[scope]), max(values[scope])
        for i in scope:
            alpha[i] += weight * ((values[i] - low) / (high - low) if high > low else 1.0)
    return alpha
