"""Building blocks for chat examples in the OpenAI/HF `messages` + `tools` convention.

Tool-call arguments are stored as JSON objects, not JSON-encoded strings: chat templates
(Qwen2.5, Llama 3.x, ours) render `tool_call.arguments | tojson`, and mlx-lm's server turns
the OpenAI wire format's string into an object before templating. Storing the object keeps
training and serving byte-identical; a string would be encoded twice in training.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

from codeadapt import tools as tools_mod

SYSTEM_PROMPT = (
    "You are a coding assistant in the {repo} repository. Use grep or read_file when the "
    "answer depends on the code, else answer directly. State only what tools showed."
)


def format_key() -> str:
    """Hash of what every example embeds besides its content: system prompt and tool schemas."""
    blob = json.dumps([SYSTEM_PROMPT, tools_mod.TOOL_SCHEMAS], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def system(repo: str) -> dict[str, Any]:
    return {"role": "system", "content": SYSTEM_PROMPT.format(repo=repo)}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": tools_mod.escape_specials(text)}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": tools_mod.escape_specials(text)}


def tool_call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """An assistant turn that calls one tool."""
    if name not in tools_mod.TOOL_NAMES:
        raise ValueError(f"unknown tool {name!r}; expected one of {sorted(tools_mod.TOOL_NAMES)}")
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        ],
    }


def tool_result(call_id: str, name: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "name": name,
            "content": tools_mod.escape_specials(content)}


def tool_schemas() -> tuple[dict[str, Any], ...]:
    return copy.deepcopy(tools_mod.TOOL_SCHEMAS)


def validate_messages(messages: Any, tools: Any) -> None:
    """Raise ValueError describing the first thing wrong with one example."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    if tools is not None and not isinstance(tools, list):
        raise ValueError("'tools' must be a list")
    pending: dict[str, str] = {}
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] is not an object")
        role = m.get("role")
        if role not in {"system", "user", "assistant", "tool"}:
            raise ValueError(f"messages[{i}].role {role!r} is not system/user/assistant/tool")
        if not isinstance(m.get("content", ""), str):
            raise ValueError(f"messages[{i}].content must be a string")
        if role == "assistant" and m.get("tool_calls"):
            for call in m["tool_calls"]:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or fn.get("name") not in tools_mod.TOOL_NAMES:
                    raise ValueError(f"messages[{i}] calls an unknown tool: {call!r}")
                if not isinstance(fn.get("arguments"), dict):
                    raise ValueError(f"messages[{i}] tool call arguments must be a JSON object")
                pending[call.get("id", "")] = fn["name"]
        if role == "tool":
            if m.get("tool_call_id") not in pending:
                raise ValueError(f"messages[{i}] answers no earlier tool call")
            pending.pop(m["tool_call_id"])
    if messages[-1].get("role") != "assistant" or messages[-1].get("tool_calls"):
        raise ValueError("the last message must be a final assistant answer")
    if pending:
        raise ValueError(f"tool calls without results: {sorted(pending)}")


def tool_calls_of(messages: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(call, result message) pairs in order, for replaying an example's tools."""
    results = {m.get("tool_call_id"): m for m in messages if m.get("role") == "tool"}
    pairs = []
    for m in messages:
        for call in m.get("tool_calls") or []:
            pairs.append((call, results.get(call.get("id"))))
    return pairs


CUT_MARK = "[cut to fit the context: {n} more lines not shown]"
_CUT_RE = re.compile(r"\[cut to fit the context: (\d+) more lines not shown\]")


def cut_lines(lines: list[str], keep: int) -> str:
    """The first `keep` lines of a tool result and a marker saying how many were cut."""
    return "\n".join([*lines[:keep], CUT_MARK.format(n=len(lines) - keep)])


def same_result(shown: Any, real: str) -> bool:
    """`shown` is `real`, or `real` cut by `cut_lines` (its head and the right count)."""
    if shown == real or not isinstance(shown, str):
        return shown == real
    head, _, mark = shown.rpartition("\n") if "\n" in shown else ("", "", shown)
    m = _CUT_RE.fullmatch(mark)
    if not m:
        return False
    lines, kept = real.splitlines(), head.splitlines() if head else []
    return lines[: len(kept)] == kept and len(lines) - len(kept) == int(m[1]) > 0


def replay_mismatches(messages: list[dict[str, Any]] | tuple[dict[str, Any], ...], root: Any,
                      clean: Callable[[str], str] = lambda text: text) -> list[int]:
    """Indices of tool messages whose content differs from `clean(rerun of their call)`."""
    messages = list(messages)
    position = {id(m): i for i, m in enumerate(messages)}
    answered: set[int] = set()
    bad: set[int] = set()
    for call, result in tool_calls_of(messages):
        if result is None:
            continue
        fn = call.get("function") or {}
        i = position[id(result)]
        answered.add(i)
        if not same_result(result.get("content"), clean(tools_mod.execute(root, fn.get("name", ""), fn.get("arguments", {})))):
            bad.add(i)
    # A result that answers no call can never replay.
    bad.update(i for i, m in enumerate(messages) if m.get("role") == "tool" and i not in answered)
    return sorted(bad)
