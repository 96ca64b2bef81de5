"""Token saliency from attention maps (stage I of TRIM).

For a sample of n tokens and one attention layer, ``A[h, i, j]`` is the softmax weight that
query i of head h puts on key j (causal, so j <= i). Two per-token signals come out of it:

- row saliency, how sharply query i spreads its attention, from the entropy
  ``H_i = -sum_j A_ij log A_ij``. The "normalized" form is ``1 - H_i / log(i)`` for a query that
  sees i >= 2 keys (1-based), so it lies in [0, 1] whatever the position. The "inverse" form is
  ``1 / (H_i + 1e-6)``.
- column saliency, the mean attention that token i receives from the queries that can see it,
  ``K_i = sum_{q >= i} A_qi / (n - i + 1)``, so early tokens gain nothing from having more viewers.

Both are averaged over every query head (with grouped-query attention the query heads, not the
key/value groups) and over the last L layers, then min-max normalized over the sample's in-scope
tokens and blended into one saliency per token. Position 0 (the attention sink) never counts.
"""

from __future__ import annotations

import numpy as np
import torch

from trimdb.settings import INVERSE_EPSILON, SaliencySettings


def layer_saliency(
    attention: torch.Tensor, lengths: torch.Tensor, row_saliency: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return head-averaged row and column saliency of one layer, each of shape (B, T).

    ``attention`` is (B, H, T, T) with right padding: sample b has ``lengths[b]`` real tokens.
    Values at padded positions are 0. Computed in float32 whatever the model dtype.
    """
    if attention.dim() != 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention must have shape (B, H, T, T), got {tuple(attention.shape)}")
    batch, _, seq, _ = attention.shape
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")

    probs = attention.float()
    positions = torch.arange(seq, device=probs.device)
    valid = positions[None, :] < lengths[:, None].to(probs.device)  # (B, T)

    # Row saliency: entropy of each query's distribution, with 0 log 0 = 0.
    entropy = -torch.where(probs > 0, probs * probs.clamp_min(1e-30).log(), 0).sum(-1)  # (B, H, T)
    if row_saliency == "normalized":
        visible = (positions + 1).to(probs.dtype)  # keys that query i sees
        log_visible = torch.where(visible >= 2, visible.log(), torch.ones_like(visible))
        row = torch.where(visible >= 2, 1 - entropy / log_visible, torch.zeros_like(entropy))
        row = row.clamp(0.0, 1.0)
    elif row_saliency == "inverse":
        row = 1.0 / (entropy + INVERSE_EPSILON)
    else:
        raise ValueError(f"unknown row saliency form {row_saliency!r}")

    # Column saliency: mean attention received from the real queries at or after position i.
    received = (probs * valid[:, None, :, None]).sum(2)  # (B, H, T): sum over queries
    viewers = (lengths[:, None].to(probs.device) - positions[None, :]).clamp_min(1)  # (B, T)
    column = received.mean(1) / viewers

    row = row.mean(1)
    return row * valid, column * valid


def blend_saliency(
    row: np.ndarray, column: np.ndarray, in_scope: np.ndarray, settings: SaliencySettings
) -> np.ndarray:
    """Min-max normalize row and column saliency over in-scope tokens and blend them.

    All three arrays have one entry per token of one sample. Position 0 is left out of the
    normalization range and gets saliency 0, like every out-of-scope token. When a signal is
    constant over the in-scope tokens it carries no ranking, so it becomes 1 for all of them.
    """
    if not row.shape == column.shape == in_scope.shape:
        raise ValueError(
            f"row, column and scope must have the same shape, got {row.shape}, {column.shape}, {in_scope.shape}"
        )
    mask = in_scope.astype(bool).copy()
    if mask.size:
        mask[0] = False
    saliency = np.zeros(row.shape, dtype=np.float32)
    if not mask.any():
        return saliency
    saliency[mask] = settings.row_weight * _min_max(row[mask]) + settings.column_weight * _min_max(column[mask])
    return saliency


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high - low <= 0:
        return np.ones_like(values, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)
