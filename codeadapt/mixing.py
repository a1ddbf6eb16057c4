"""The training mix: how often each kind of first step is drawn.

Built data is skewed by what repositories contain: in the phase-7 data 342 of 611
conversations start with the same definition search (`^\\s*(class|def|async def) Name\\b`) and
15 with an `async def` search, so the model learns the common search as the answer to every
question. Drawing each conversation with probability proportional to n^(exponent - 1), n being
how many conversations share its first step, moves the mix toward the rarer steps: exponent 1
is the data as built, 0 every first step equally often, 0.5 in between (the square-root
mixing of multilingual and multi-task training).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

# Regex escapes stay (they are the search's shape), names and numbers become X.
_NAME = re.compile(r"\\.|[A-Za-z_][\w.]*|\d+")


def first_step(messages: Sequence[dict[str, Any]]) -> str:
    """What a conversation's first assistant turn does, with the names it uses masked:
    "answer", "read_file", or "grep " + the pattern's shape (e.g. `^\\s*X \\w+\\(.*\\bX\\b`
    for a subclass search)."""
    for m in messages:
        if m.get("role") != "assistant":
            continue
        calls = m.get("tool_calls") or []
        if not calls:
            return "answer"
        fn = calls[0].get("function") or {}
        name, args = str(fn.get("name")), fn.get("arguments")
        if name != "grep" or not isinstance(args, dict):
            return name
        pattern = str(args.get("pattern", ""))
        return "grep " + _NAME.sub(lambda x: x[0] if x[0].startswith("\\") else "X", pattern)
    return "answer"


def mix_weights(groups: Sequence[str], exponent: float) -> np.ndarray | None:
    """Draw probabilities ∝ n(group)^(exponent - 1), summing to 1; None for exponent 1 (the
    data as built: every record once per epoch, in shuffled order)."""
    if exponent == 1.0:
        return None
    n = Counter(groups)
    w = np.array([float(n[g]) ** (exponent - 1.0) for g in groups])
    return w / w.sum()


def mix_shares(groups: Sequence[str], weights: np.ndarray | None) -> dict[str, float]:
    """Each group's share of the draws (for the metrics and the data card)."""
    out: Counter[str] = Counter()
    for g, w in zip(groups, weights if weights is not None else [1.0 / len(groups)] * len(groups)):
        out[g] += float(w)
    return {g: round(v, 4) for g, v in out.most_common()}
