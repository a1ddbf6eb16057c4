"""Train the top of a model on a cache of what its frozen bottom computes.

With LoRA on the top k blocks, the blocks below never change during a training: an example's
hidden state after them is a function of its tokens alone. `FrozenBottom` computes it once,
the first time a batch holds the example, and keeps it; every later epoch runs only the top k
blocks forward and backward. On SmolLM2 with LoRA on 8 of 30 blocks the 22 frozen blocks are
about half of a training step's work (their forward pass; the top 8 need forward and backward),
so epochs after the first cost about half as much.

The cached path is exact: right padding never reaches a real token through causal attention,
and the top blocks see the same inputs they would see from the full model.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def split_point(model: Any, lora_layers: int) -> int | None:
    """How many bottom blocks are frozen, or None where the model cannot be split this way."""
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None or not hasattr(body, "embed_tokens") or not hasattr(body, "norm"):
        return None
    if lora_layers < 1 or lora_layers >= len(layers):
        return None
    return len(layers) - lora_layers


def _mask(h: Any) -> Any:
    from mlx_lm.models.base import create_attention_mask

    return create_attention_mask(h, None)


def bottom(model: Any, tokens: Any, n_frozen: int) -> Any:
    """Hidden states after the first `n_frozen` blocks."""
    body = model.model
    h = body.embed_tokens(tokens)
    mask = _mask(h)
    for layer in body.layers[:n_frozen]:
        h = layer(h, mask, None)
    return h


def top(model: Any, hidden: Any, n_frozen: int) -> Any:
    """Final (normed) hidden states from the states after the first `n_frozen` blocks."""
    body = model.model
    mask = _mask(hidden)
    h = hidden
    for layer in body.layers[n_frozen:]:
        h = layer(h, mask, None)
    return body.norm(h)


class FrozenBottom:
    """Per-example cache of the frozen blocks' output, filled batch by batch."""

    def __init__(self, model: Any, n_frozen: int) -> None:
        self.model, self.n_frozen = model, n_frozen
        self.cache: dict[int, Any] = {}
        self.hits = self.misses = 0

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.cache.values())

    def hidden(self, ids: list[int], tokens: np.ndarray, lengths: list[int]) -> Any:
        """(B, L, H) hidden states for the batch `tokens` (B, L) of examples `ids`."""
        import mlx.core as mx

        todo = [r for r, i in enumerate(ids) if i not in self.cache]
        if todo:
            h = bottom(self.model, mx.array(tokens[todo]), self.n_frozen)
            mx.eval(h)
            for row, r in enumerate(todo):
                self.cache[ids[r]] = h[row, : lengths[r]]
        self.misses += len(todo)
        self.hits += len(ids) - len(todo)
        width = tokens.shape[1]
        rows = []
        for i in ids:
            a = self.cache[i][:width]
            if a.shape[0] < width:
                a = mx.concatenate([a, mx.zeros((width - a.shape[0], a.shape[1]), a.dtype)])
            rows.append(a)
        return mx.stack(rows)
