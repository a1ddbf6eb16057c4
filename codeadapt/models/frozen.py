"""Train the top of a model on a cache of what its frozen bottom computes.

With LoRA on the top k blocks, the blocks below never change: an example's hidden state after
them is a function of its tokens and the base weights alone. `FrozenBottom` computes it once,
the first time a batch holds the example, and keeps it; every later use runs only the top k
blocks. On SmolLM2 with LoRA on 8 of 30 blocks the 22 frozen blocks are about 45% of a training
step (their forward pass; the top 8 need forward and backward).

Each example's bottom is computed alone, at its own length: no padding to the batch's longest
(on phase-7 batches 14-20% less time than padded batches) and a value that depends on the tokens
only, never on which batch first held them. That makes a disk store exact to share: with a
`store` directory (keyed by base weights, frozen depth and kernels) the states outlive the
process, so phase 7 reuses what phase 6 computed for the examples they share (phases extend
each other) and its validation reuses phase 6's. Files are written whole (rename) and the
least recently used are deleted past a size cap (`prune`); deleting the directory is safe.

The cached path is exact up to float rounding: right padding never reaches a real token through
causal attention, and the top blocks see the inputs they would see from the full model.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FROZEN_VERSION = "2"  # bump when a stored state for the same key would change


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


def store_dir(root: str | Path, base_sha256: str, n_frozen: int, kernels: str) -> Path:
    """Where states of one (base weights, frozen depth, attention kernels, mlx) live under `root`."""
    import mlx.core as mx

    tag = f"{FROZEN_VERSION}\0{base_sha256}\0{n_frozen}\0{kernels}\0{mx.__version__}"
    return Path(root) / hashlib.sha256(tag.encode()).hexdigest()[:20]


def tokens_key(tokens: Sequence[int] | np.ndarray) -> str:
    return hashlib.sha256(np.asarray(tokens, np.int32).tobytes()).hexdigest()


def prune(root: str | Path, max_bytes: int, pattern: str = "*/*.npy") -> int:
    """Delete the least recently used files matching `pattern` under `root` until they weigh
    at most `max_bytes`; returns how many were deleted."""
    files = []
    for p in Path(root).glob(pattern):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        files.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in files)
    deleted = 0
    for _, size, p in sorted(files, key=lambda f: f[0]):
        if total <= max_bytes:
            break
        p.unlink(missing_ok=True)
        total -= size
        deleted += 1
    return deleted


class FrozenBottom:
    """Per-example cache of the frozen blocks' output, keyed by the example's tokens: in
    memory, and in `store` (a directory from `store_dir`) when given."""

    def __init__(self, model: Any, n_frozen: int, store: str | Path | None = None) -> None:
        self.model, self.n_frozen = model, n_frozen
        self.store = Path(store) if store is not None else None
        self.cache: dict[str, Any] = {}
        self.hits = self.misses = self.loaded = 0  # in memory, computed, read from the store

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.cache.values())

    def _load(self, key: str) -> Any:
        import mlx.core as mx

        if self.store is None:
            return None
        path = self.store / f"{key}.npy"
        try:
            a = np.load(path, allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError, EOFError):
            return None  # absent, or unreadable: compute it again (and rewrite it)
        if a.ndim != 2 or a.dtype != np.float32:
            return None
        os.utime(path)  # recently used: pruned last
        return mx.array(a)

    def _save(self, key: str, h: Any) -> None:
        if self.store is None:
            return
        from codeadapt.fsutil import write_bytes

        buf = io.BytesIO()
        np.save(buf, np.asarray(h), allow_pickle=False)
        write_bytes(self.store / f"{key}.npy", buf.getvalue(), fsync=False)

    def states(self, tokens: Sequence[int] | np.ndarray) -> Any:
        """(len(tokens), H) hidden states of one example after the frozen blocks."""
        import mlx.core as mx

        key = tokens_key(tokens)
        if key in self.cache:
            self.hits += 1
            return self.cache[key]
        h = self._load(key)
        if h is not None and h.shape[0] == len(tokens):
            self.loaded += 1
        else:
            h = bottom(self.model, mx.array(np.asarray(tokens, np.int32)[None]), self.n_frozen)[0]
            mx.eval(h)
            self.misses += 1
            self._save(key, h)
        self.cache[key] = h
        return h

    def hidden(self, examples: Sequence[Sequence[int] | np.ndarray], width: int) -> Any:
        """(B, width, H) hidden states of a batch of examples, zero past each one's end."""
        import mlx.core as mx

        rows = []
        for tokens in examples:
            a = self.states(tokens)[:width]
            if a.shape[0] < width:
                a = mx.concatenate([a, mx.zeros((width - a.shape[0], a.shape[1]), a.dtype)])
            rows.append(a)
        return mx.stack(rows)
