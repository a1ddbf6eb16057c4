"""Hand-written examples shipped in data/handwritten/: load and validate them, rerun their
tool calls against a checkout, and find tool results that no longer replay."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from codeadapt import chat, tools
from codeadapt.records import Example

# Bump when the shipped files or their meaning change, so cached datasets are rebuilt.
HANDWRITTEN_VERSION = "1"
HANDWRITTEN_KINDS = frozenset({"handwritten_grep", "handwritten_read", "handwritten_direct"})
# The tool a kind's example must call at least once; direct answers call none.
_KIND_TOOL = {"handwritten_grep": "grep", "handwritten_read": "read_file"}
_RECORD_KEYS = frozenset({"messages", "tools", "meta"})
_META_KEYS = frozenset({"source", "path", "kind", "start_line", "end_line"})


def _check_meta(meta: Any) -> dict[str, Any]:
    """The meta object with line defaults filled in; ValueError says what is wrong."""
    if not isinstance(meta, dict):
        raise ValueError(f"'meta' must be an object, got {type(meta).__name__}")
    extra = set(meta) - _META_KEYS
    if extra:
        raise ValueError(f"unknown meta keys {sorted(extra)}; expected {sorted(_META_KEYS)}")
    for key in ("source", "path", "kind"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise ValueError(f"meta.{key} must be a non-empty string, got {meta.get(key)!r}")
    if meta["kind"] not in HANDWRITTEN_KINDS:
        raise ValueError(f"meta.kind {meta['kind']!r} is not one of {sorted(HANDWRITTEN_KINDS)}")
    rel = meta["path"]
    if rel.startswith("/") or "\\" in rel or ".." in rel.split("/"):
        raise ValueError(f"meta.path {rel!r} must be relative to the source root, POSIX style")
    lines = {}
    for key in ("start_line", "end_line"):
        value = meta.get(key, 1)
        # bool is an int subclass; `true` in JSON is a typo, not line 1.
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"meta.{key} must be a positive integer, got {value!r}")
        lines[key] = value
    if lines["end_line"] < lines["start_line"]:
        raise ValueError(
            f"meta.end_line {lines['end_line']} is before start_line {lines['start_line']}"
        )
    return {**meta, **lines}


def _check_tools(tool_list: Any, messages: list[dict[str, Any]], kind: str) -> None:
    """Declared tools are well formed, calls use only them, and calls fit the kind."""
    if not isinstance(tool_list, list):
        raise ValueError(f"'tools' must be a list, got {type(tool_list).__name__}")
    declared = set()
    for i, schema in enumerate(tool_list):
        fn = schema.get("function") if isinstance(schema, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"tools[{i}] is not a function schema with a name")
        declared.add(fn["name"])
    called = [call["function"]["name"] for call, _ in chat.tool_calls_of(messages)]
    undeclared = sorted(set(called) - declared)
    if undeclared:
        raise ValueError(f"calls tools {undeclared} that 'tools' does not declare")
    if kind == "handwritten_direct" and called:
        raise ValueError(f"kind {kind!r} must answer without tools, but calls {called}")
    needed = _KIND_TOOL.get(kind)
    if needed and needed not in called:
        raise ValueError(f"kind {kind!r} must call {needed!r} at least once, calls {called}")


def parse_record(record: Any) -> Example:
    """One decoded JSONL record as an Example; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"line must be a JSON object, got {type(record).__name__}")
    missing = sorted(_RECORD_KEYS - set(record))
    if missing:
        raise ValueError(f"missing keys {missing}; expected {sorted(_RECORD_KEYS)}")
    extra = sorted(set(record) - _RECORD_KEYS)
    if extra:
        raise ValueError(f"unknown keys {extra}; expected {sorted(_RECORD_KEYS)}")
    meta = _check_meta(record["meta"])
    chat.validate_messages(record["messages"], record["tools"])
    _check_tools(record["tools"], record["messages"], meta["kind"])
    return Example(
        messages=tuple(record["messages"]),
        tools=tuple(record["tools"]),
        source=meta["source"],
        commit="",  # the dataset builder pins the source checkout's commit
        path=meta["path"],
        start_line=meta["start_line"],
        end_line=meta["end_line"],
        kind=meta["kind"],
        generator_version=HANDWRITTEN_VERSION,
    )


def load_handwritten(path: Path) -> list[Example]:
    """Every example in a hand-written JSONL file; a bad line raises `path:lineno: why`."""
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                examples.append(parse_record(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from None
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
            except (TypeError, KeyError, AttributeError, IndexError) as exc:  # a wrongly shaped field
                raise ValueError(f"{path}:{lineno}: malformed record ({type(exc).__name__}: {exc})") from None
    if not examples:
        raise ValueError(f"{path}: no examples; expected one JSON object per line")
    return examples


def refill_tool_results(record: dict[str, Any], root: Path) -> dict[str, Any]:
    """`record` with every tool result rerun on `root` and the current tool schemas.

    A call without a result message gets one, right after the results already answering
    its turn, so a draft can hold only the calls.
    """
    out: list[dict[str, Any]] = []
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise ValueError("'messages' must be a list")
    results = {
        m.get("tool_call_id"): m
        for m in messages
        if isinstance(m, dict) and m.get("role") == "tool"
    }
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "tool":
            continue  # re-emitted after the turn that calls it
        out.append(m)
        for call in (m.get("tool_calls") or []) if isinstance(m, dict) else []:
            fn = call["function"]
            content = tools.execute(root, fn["name"], fn.get("arguments", {}))
            old = results.pop(call.get("id"), None)
            if old is None:
                out.append(chat.tool_result(call["id"], fn["name"], content))
            else:
                out.append({**old, "content": content})
    if results:
        raise ValueError(f"tool results answer no call: {sorted(map(str, results))}")
    return {**record, "messages": out, "tools": list(chat.tool_schemas())}
