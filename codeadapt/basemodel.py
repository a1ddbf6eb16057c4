"""Choosing and preparing the base model: a named mlx-lm model, or the offline tiny base.

The tiny base is built from a tokenizer corpus (the base group's code and chat examples),
then pre-trained with a full fine-tune on the `base` phase's train split, whose sources no
phase uses, so nothing of any phase's test split reaches the base.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from codeadapt.base import BASE_VERSION
from codeadapt.secrets import redact_text

MAX_CODE_BYTES = 3_000_000  # enough for a 4k vocab; more only slows the BPE trainer


def record_texts(jsonl: Path) -> Iterator[str]:
    """The strings a chat record puts in front of the model: contents, calls, tool schemas
    (once per record, as often as the model will see them, so BPE learns to pack them)."""
    with jsonl.open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            for tool in rec.get("tools") or []:
                yield json.dumps(tool, ensure_ascii=False)
            for m in rec["messages"]:
                if m.get("content"):
                    yield m["content"]
                for call in m.get("tool_calls") or []:
                    yield json.dumps(call["function"], ensure_ascii=False)


def code_texts(checkouts: Iterable[Path], limit: int = MAX_CODE_BYTES) -> Iterator[str]:
    """Python files of the checkouts, in a fixed order, up to `limit` bytes."""
    used = 0
    for root in checkouts:
        for p in sorted(Path(root).rglob("*.py")):
            if ".git" in p.parts or p.is_symlink() or not p.is_file():
                continue
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if used + len(text) > limit:
                return
            used += len(text)
            yield redact_text(text)[0]  # the tiny tokenizer's corpus is written to disk


def tokenizer_corpus(base_data: Path, checkouts: Iterable[Path]) -> list[str]:
    """Corpus for the tiny tokenizer: the base train split's chat text, then base code."""
    train = Path(base_data) / "train.jsonl"
    if not train.is_file():
        raise FileNotFoundError(f"{train} not found: build the base corpus dataset first")
    return [*record_texts(train), *code_texts(checkouts)]


def corpus_key(corpus: list[str], tiny_args: dict[str, Any]) -> str:
    """Names a tiny base by what it is built from: same corpus and args, same directory."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": BASE_VERSION, "args": tiny_args}, sort_keys=True).encode())
    for text in corpus:
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()[:16]
