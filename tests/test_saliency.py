"""Saliency on hand-made attention matrices, against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trimdb.saliency import blend_saliency, layer_saliency
from trimdb.settings import SaliencySettings

# One head, three tokens. Query 0 sees itself; query 1 splits evenly; query 2 looks at token 0.
ONE_HEAD = torch.tensor([[[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]]])  # (B=1, H=1, T=3, T=3)


def test_normalized_row_saliency():
    row, _ = layer_saliency(ONE_HEAD, torch.tensor([3]), "normalized")
    # Query 0 sees one key, so it has no normalized form and gets 0; query 1 has the maximum
    # entropy log 2 over its 2 keys, so 0; query 2 is one-hot, so 1.
    assert row[0].tolist() == pytest.approx([0.0, 0.0, 1.0])


def test_inverse_row_saliency():
    row, _ = layer_saliency(ONE_HEAD, torch.tensor([3]), "inverse")
    assert row[0].tolist() == pytest.approx([1e6, 1 / (math.log(2) + 1e-6), 1e6], rel=1e-6)


def test_column_saliency_is_mean_over_viewers():
    _, column = layer_saliency(ONE_HEAD, torch.tensor([3]), "normalized")
    # Token 0 is seen by 3 queries (1 + 0.5 + 1), token 1 by 2 (0.5 + 0), token 2 by 1 (0).
    assert column[0].tolist() == pytest.approx([2.5 / 3, 0.25, 0.0])


def test_padding_queries_do_not_count():
    padded = ONE_HEAD.clone()
    padded[0, 0, 2] = torch.tensor([0.2, 0.8, 0.0])  # a padded query row that must be ignored
    row, column = layer_saliency(padded, torch.tensor([2]), "normalized")
    assert column[0].tolist() == pytest.approx([1.5 / 2, 0.5 / 1, 0.0])
    assert row[0].tolist() == pytest.approx([0.0, 0.0, 0.0])


def test_batch_rows_are_independent():
    batch = torch.cat([ONE_HEAD, ONE_HEAD])
    row, column = layer_saliency(batch, torch.tensor([3, 2]), "normalized")
    assert column[0].tolist() == pytest.approx([2.5 / 3, 0.25, 0.0])
    assert column[1].tolist() == pytest.approx([1.5 / 2, 0.5, 0.0])
    assert row[1, 2].item() == 0.0


def test_query_heads_are_averaged():
    # Two query heads, as grouped-query attention produces them: the mean is over query heads.
    second = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    heads = torch.stack([ONE_HEAD[0, 0], second])[None]  # (1, 2, 3, 3)
    row, column = layer_saliency(heads, torch.tensor([3]), "normalized")
    assert row[0].tolist() == pytest.approx([0.0, (0 + 1) / 2, (1 + 0) / 2], abs=1e-6)
    assert column[0, 0].item() == pytest.approx((2.5 / 3 + (1 + 1 + 1 / 3) / 3) / 2)


def test_inverse_form_averages_after_inverting():
    second = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    heads = torch.stack([ONE_HEAD[0, 0], second])[None]
    row, _ = layer_saliency(heads, torch.tensor([3]), "inverse")
    expected = (1 / 1e-6 + 1 / (math.log(3) + 1e-6)) / 2
    assert row[0, 2].item() == pytest.approx(expected, rel=1e-6)


def test_layer_saliency_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"shape \(B, H, T, T\)"):
        layer_saliency(torch.zeros(1, 3, 3), torch.tensor([3]), "normalized")
    with pytest.raises(ValueError, match=r"lengths must have shape \(1,\)"):
        layer_saliency(ONE_HEAD, torch.tensor([3, 3]), "normalized")


def test_blend_excludes_first_token():
    row = np.array([100.0, 0.2, 0.4, 0.6])
    column = np.array([100.0, 1.0, 0.0, 0.5])
    saliency = blend_saliency(row, column, np.ones(4, bool), SaliencySettings())
    # Position 0 neither counts nor sets the range: row 0.2..0.6 -> 0, 0.5, 1; column 0..1 -> 1, 0, 0.5.
    assert saliency.tolist() == pytest.approx([0.0, 0.5 * 0 + 0.5 * 1, 0.5 * 0.5 + 0, 0.5 * 1 + 0.5 * 0.5])


def test_blend_normalizes_over_scope_only():
    row = np.array([0.0, 0.1, 0.9, 0.5])
    column = np.zeros(4)
    in_scope = np.array([False, True, False, True])
    saliency = blend_saliency(row, column, in_scope, SaliencySettings(row_weight=1.0, column_weight=0.0))
    assert saliency.tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0])


def test_blend_constant_signal_counts_fully():
    saliency = blend_saliency(np.full(3, 0.3), np.array([0.0, 1.0, 3.0]), np.ones(3, bool), SaliencySettings())
    assert saliency.tolist() == pytest.approx([0.0, 0.5 + 0.0, 0.5 + 0.5])


def test_blend_empty_scope_is_zero():
    saliency = blend_saliency(np.ones(3), np.ones(3), np.zeros(3, bool), SaliencySettings())
    assert saliency.tolist() == [0.0, 0.0, 0.0]
