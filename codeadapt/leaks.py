"""Decontamination on content: a held-out conversation whose tool calls and results repeat a
train conversation's (exactly, or nearly: word 5-gram Jaccard >= NEAR) is a leak however its
question is worded. "Which classes in structlog subclass `BoundLoggerBase`?" and train's "List
the subclasses of `BoundLoggerBase` in structlog." make the same call and get the same result:
a model can answer from memory. Leaked items are excluded from scoring and counted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

NEAR = 0.8  # word 5-gram Jaccard of the tool content at which two conversations are one
_WORDS = re.compile(r"\w+")


def tool_content(messages: Sequence[dict[str, Any]]) -> str:
    """The calls (name + arguments as JSON) and tool results of a conversation, in order."""
    parts = []
    for m in messages:
        for call in m.get("tool_calls") or []:
            fn = call.get("function", {})
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    pass
            parts.append(f"{fn.get('name')} {json.dumps(args, sort_keys=True)}")
        if m.get("role") == "tool":
            parts.append(" ".join(str(m.get("content", "")).split()))
    return "\n".join(parts)


def _shingles(text: str, n: int = 5) -> frozenset[tuple[str, ...]]:
    words = _WORDS.findall(text.lower())
    if len(words) < n:
        return frozenset({tuple(words)}) if words else frozenset()
    return frozenset(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def content_leaks(held_out: dict[str, Sequence[dict[str, Any]]],
                  train: Iterable[Sequence[dict[str, Any]]], near: float = NEAR) -> dict[str, str]:
    """{held-out id: "exact" | "near"} for held-out conversations (by id) whose tool content
    repeats a train conversation's; conversations without tool calls are not compared."""
    exact: set[str] = set()
    shingles: list[frozenset[tuple[str, ...]]] = []
    index: dict[tuple[str, ...], list[int]] = {}
    for msgs in train:
        content = tool_content(msgs)
        if not content:
            continue
        exact.add(content)
        sh = _shingles(content)
        for g in sh:
            index.setdefault(g, []).append(len(shingles))
        shingles.append(sh)
    out: dict[str, str] = {}
    for hid, msgs in held_out.items():
        content = tool_content(msgs)
        if not content:
            continue
        if content in exact:
            out[hid] = "exact"
            continue
        sh = _shingles(content)
        shared: dict[int, int] = {}
        for g in sh:
            for j in index.get(g, ()):
                shared[j] = shared.get(j, 0) + 1
        if any(k / len(sh | shingles[j]) >= near for j, k in shared.items()):
            out[hid] = "near"
    return out
