"""Prompt prefill shared across the rows of an evaluation through the base's frozen blocks.

Every row of the report (the base and each phase's adapter) reads the same prompts, and an
adapter with LoRA on the top k blocks leaves the blocks below as the base has them: the keys,
values and hidden states those blocks compute for a prompt chunk are the same for every row.
`SharedBottom` stores them per chunk in a directory, so the first row to prefill a chunk
computes the bottom and the others append the stored keys and values to their caches and run
only their top blocks.
Measured on the default run's prompts (README): prefill is a third of a row's generation time
and the bottom 22 of SmolLM2's 30 blocks are most of it.

Exact: a chunk's key is every token up to its end, where it starts, and the boundaries of the
chunks its cache was built from (`lineage`: a row's float rounding depends on the shapes its
prefix was computed in, so the same tokens chunked otherwise are another key); the stored
arrays are then what the same operations on the same inputs give, and appending them to a KV
cache is what the cache does with computed ones. One SharedBottom follows one cache: the
running prefix cache of the batched generator (`trim` where that cache is rewound).
Only plain KV caches of llama/qwen2-style models without sliding windows take this path
(`SharedBottom.supports`); files are written whole (rename) and pruned like the frozen
states of training (`codeadapt.models.frozen.prune`).
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PREFILL_VERSION = "1"  # bump when a stored chunk for the same key would change
MAX_STORE_BYTES = 4 << 30  # least recently used chunks are deleted past this (`prune`)


def prune(root: str | Path, max_bytes: int = MAX_STORE_BYTES) -> int:
    from codeadapt.models.frozen import prune as prune_lru

    return prune_lru(root, max_bytes, "*/*.npz")


def store_dir(root: str | Path, base_sha256: str, n_shared: int, kernels: str) -> Path:
    """Where the chunks of one (base weights, shared depth, attention kernels, mlx) live."""
    import mlx.core as mx

    tag = f"{PREFILL_VERSION}\0{base_sha256}\0{n_shared}\0{kernels}\0{mx.__version__}"
    return Path(root) / hashlib.sha256(tag.encode()).hexdigest()[:20]


def adapter_depth(adapter_dir: str | Path | None, n_layers: int) -> int:
    """How many bottom blocks an adapter leaves as the base has them (all without one)."""
    import json

    if adapter_dir is None:
        return n_layers
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    top = int(cfg.get("num_layers", -1))
    return n_layers - top if 0 < top <= n_layers else 0


class SharedBottom:
    """Prefill through stored bottom-block chunks; `n_shared` blocks from the bottom."""

    def __init__(self, store: str | Path, n_shared: int) -> None:
        self.store, self.n = Path(store), n_shared
        self.loaded = self.computed = 0  # chunks
        self.lineage: list[tuple[int, int]] = []  # (start, end) of the chunks the cache holds

    def stats(self) -> dict[str, int]:
        return {"blocks": self.n, "chunks_loaded": self.loaded, "chunks_computed": self.computed}

    def trim(self, keep: int) -> None:
        """The cache was cut back to its first `keep` tokens."""
        self.lineage = [(s, e) for s, e in self.lineage if s < keep]

    @staticmethod
    def supports(model: Any, cache: Sequence[Any], n_shared: int) -> bool:
        from mlx_lm.models.cache import KVCache

        body = getattr(model, "model", None)
        layers = getattr(body, "layers", None)
        return (layers is not None and 0 < n_shared <= len(layers)
                and type(body).__module__ in ("mlx_lm.models.llama", "mlx_lm.models.qwen2")
                and getattr(body, "swa_idx", None) is None and getattr(body, "fa_idx", 0) == 0
                and all(type(c) is KVCache for c in cache))

    def _load(self, path: Path) -> dict[str, np.ndarray] | None:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile):
            return None  # absent or unreadable: compute it (and write it again)
        if not all(f"k{i}" in arrays and f"v{i}" in arrays for i in range(self.n)) or "h" not in arrays:
            return None
        os.utime(path)
        return arrays

    def _save(self, path: Path, arrays: dict[str, Any]) -> None:
        from codeadapt.fsutil import write_bytes

        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        write_bytes(path, buf.getvalue(), fsync=False)

    def run(self, model: Any, cache: list[Any], seen: Sequence[int], start: int) -> None:
        """Append `seen[start:]` to `cache` (which holds `seen[:start]`) through every block."""
        import mlx.core as mx
        from mlx_lm.models.base import create_attention_mask

        body = model.model
        if cache[0].offset != start:
            raise ValueError(f"cache holds {cache[0].offset} tokens, chunk starts at {start}")
        chunk = mx.array(list(seen[start:]))[None]
        if self.lineage and self.lineage[-1][1] < start:
            raise ValueError(f"chunk at {start} after a cache of {self.lineage[-1][1]} tokens")
        history = np.asarray([*self.lineage, (start, len(seen))], np.int64).tobytes()
        key = hashlib.sha256(np.asarray(seen, np.int32).tobytes() + b"\0" + history)
        path = self.store / f"{key.hexdigest()[:40]}.npz"
        width = len(seen) - start
        stored = self._load(path)
        if stored is not None and stored["h"].shape[1] == width:
            mask = create_attention_mask(mx.zeros((1, width, 1)), cache[0])
            for i in range(self.n):
                cache[i].update_and_fetch(mx.array(stored[f"k{i}"]), mx.array(stored[f"v{i}"]))
            h = mx.array(stored["h"])
            self.loaded += 1
        else:
            h = body.embed_tokens(chunk)
            mask = create_attention_mask(h, cache[0])
            for layer, c in zip(body.layers[: self.n], cache[: self.n]):
                h = layer(h, mask, cache=c)
            mx.eval(h, [c.state for c in cache[: self.n]])
            arrays = {"h": h}
            for i, c in enumerate(cache[: self.n]):
                arrays[f"k{i}"] = c.keys[..., start : start + width, :]
                arrays[f"v{i}"] = c.values[..., start : start + width, :]
            self._save(path, arrays)
            self.computed += 1
        for layer, c in zip(body.layers[self.n :], cache[self.n :]):
            h = layer(h, mask, cache=c)
        self.lineage.append((start, len(seen)))


def for_row(model: Any, model_dir: str | Path, adapter_dir: str | Path | None,
            root: str | Path | None, base_top: int | None, fast_kernels: bool) -> SharedBottom | None:
    """The SharedBottom of one evaluation row under `root`, or None (no store, or nothing
    shared). An adapter shares the blocks below its LoRA layers; the base row, which has none,
    stores the split the adapters of this run use (`base_top` blocks adapted from the top)."""
    from codeadapt.train import weights_sha256

    layers = getattr(getattr(model, "model", None), "layers", None)
    if root is None or layers is None:
        return None
    if adapter_dir is not None:
        n = adapter_depth(adapter_dir, len(layers))
    else:
        n = len(layers) - base_top if base_top and 0 < base_top < len(layers) else 0
    if n <= 0:
        return None
    kernels = "fast" if fast_kernels else "mlx"
    return SharedBottom(store_dir(root, weights_sha256(Path(model_dir)), n, kernels), n)
