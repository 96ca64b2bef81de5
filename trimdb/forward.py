"""Batched forward passes that return unit-normalized final hidden states and saliency parts.

Sequences are sorted by length and packed into right-padded batches of at most ``batch_tokens``
padded tokens, so short samples do not pay for long ones. With right padding every real query
sees only real keys, and the hidden states of real tokens do not depend on the padding.

Saliency needs attention probabilities, which only the eager attention kernel returns. Only the
last L layers run eager attention; the layers below them run SDPA on the same additive mask.
Forward hooks on the last L attention modules reduce each layer's (B, H, T, T) map to two (B, T)
vectors at once, so no more than one layer's map is alive at a time.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from trimdb.errors import SettingsError
from trimdb.saliency import layer_saliency
from trimdb.settings import SaliencySettings

log = logging.getLogger(__name__)


@dataclass
class TokenStates:
    """Per-token outputs of one sample: unit hidden states (n, D) and saliency parts (n,)."""

    hidden: np.ndarray
    row: np.ndarray | None = None
    column: np.ndarray | None = None


class _SaliencyCapture:
    """Forward hooks that accumulate row and column saliency over the last L layers."""

    def __init__(self, attention_modules: Sequence[torch.nn.Module], row_saliency: str):
        self.row_saliency = row_saliency
        self.lengths: torch.Tensor | None = None
        self.row_sum: torch.Tensor | None = None
        self.column_sum: torch.Tensor | None = None
        self.layers_seen = 0
        self.handles = [module.register_forward_hook(self._hook) for module in attention_modules]

    def reset(self, lengths: torch.Tensor) -> None:
        self.lengths, self.row_sum, self.column_sum, self.layers_seen = lengths, None, None, 0

    def _hook(self, module, inputs, output) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError(
                f"{type(module).__name__} returned no attention weights; saliency needs the eager "
                "attention implementation"
            )
        row, column = layer_saliency(weights, self.lengths, self.row_saliency)
        self.row_sum = row if self.row_sum is None else self.row_sum + row
        self.column_sum = column if self.column_sum is None else self.column_sum + column
        self.layers_seen += 1

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.row_sum / self.layers_seen, self.column_sum / self.layers_seen

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def attention_modules(model: torch.nn.Module, last: int) -> list[torch.nn.Module]:
    """Return the self-attention modules of the model's last ``last`` decoder layers."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder.layers; trimdb supports Llama-style causal LMs")
    if last > len(layers):
        raise SettingsError(
            f"cannot average saliency over the last {last} layers because the model has {len(layers)} layers. "
            f"Pass --layers {len(layers)} or fewer"
        )
    return [layer.self_attn for layer in layers[len(layers) - last :]]


@contextlib.contextmanager
def sdpa_below_last_layers(model: torch.nn.Module, last: int):
    """Run every attention layer except the last ``last`` with SDPA while the model is set to eager.

    The eager setting makes the model build an additive float mask, which SDPA accepts too, so
    only the layers whose maps are captured pay for materialized attention probabilities.
    """
    layers = model.get_decoder().layers
    originals = []
    for layer in layers[: len(layers) - last]:
        attention = layer.self_attn
        originals.append((attention, attention.config))
        config = copy.copy(attention.config)
        config._attn_implementation = "sdpa"
        attention.config = config
    try:
        yield
    finally:
        for attention, config in originals:
            attention.config = config


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group sequence indices, longest first, into batches of at most ``batch_tokens`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # The first member of a batch is its longest, so it fixes the padded width.
        width = lengths[current[0]] if current else lengths[index]
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def encode(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    batch_tokens: int,
    pad_id: int,
    saliency: SaliencySettings | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[int, TokenStates]]:
    """Run the model over ``sequences`` and yield ``(index, TokenStates)`` in batch order.

    With ``saliency`` the model must use eager attention; the row and column parts are the
    means over the last ``saliency.layers`` layers. ``on_batch(samples, tokens)`` reports progress.
    """
    capture = None
    speedup = contextlib.nullcontext()
    if saliency is not None:
        capture = _SaliencyCapture(attention_modules(model, saliency.layers), saliency.row_saliency)
        speedup = sdpa_below_last_layers(model, saliency.layers)
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    try:
        with speedup:
            for batch in plan_batches([len(s) for s in sequences], batch_tokens):
                yield from _encode_batch(decoder, sequences, batch, pad_id, device, capture)
                if on_batch is not None:
                    on_batch(len(batch), sum(len(sequences[i]) for i in batch))
    finally:
        if capture is not None:
            capture.remove()


def _encode_batch(decoder, sequences, batch, pad_id, device, capture):
    lengths = torch.tensor([len(sequences[i]) for i in batch])
    width = int(lengths.max())
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    for row, index in enumerate(batch):
        input_ids[row, : lengths[row]] = torch.as_tensor(list(sequences[index]), dtype=torch.long)
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    if capture is not None:
        capture.reset(lengths.to(device))

    with torch.inference_mode():
        output = decoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        hidden = output.last_hidden_state.float()  # (B, T, D), after the final norm
        hidden = torch.nn.functional.normalize(hidden, dim=-1).cpu().numpy()
        if capture is not None:
            row, column = (part.cpu().numpy() for part in capture.means())

    for position, index in enumerate(batch):
        n = int(lengths[position])
        states = TokenStates(hidden=hidden[position, :n].copy())
        if capture is not None:
            states.row = row[position, :n].copy()
            states.column = column[position, :n].copy()
        yield index, states
