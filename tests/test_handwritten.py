"""The shipped hand-written svcs examples, and the loader that guards them."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from codeadapt import chat, tools
from codeadapt.dataset import replay_mismatches
from codeadapt.handwritten import (
    HANDWRITTEN_KINDS,
    HANDWRITTEN_VERSION,
    load_handwritten,
    refill_tool_results,
)
from codeadapt.records import Example

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "handwritten" / "phase5.jsonl"
# The offline svcs snapshot keeps paths relative to site-packages, so this dir replays it.
SITE = Path(importlib.util.find_spec("svcs").origin).parent.parent
CITATION = re.compile(r"(svcs/[\w/]+\.py):(\d+)(?:-(\d+))?")
API_NAME = re.compile(r"`(svcs(?:\.\w+)+)[(`]")
FENCED = re.compile(r"```.*?```", re.DOTALL)


@pytest.fixture(scope="module")
def shipped() -> list[Example]:
    return load_handwritten(SHIPPED)


def _calls(example: Example) -> list[dict[str, Any]]:
    return [call["function"] for call, _ in chat.tool_calls_of(list(example.messages))]


def _shown_lines(example: Example) -> dict[str, set[int]]:
    """Lines of each file that the example's tool results show, by path."""
    shown: dict[str, set[int]] = {}
    for call, result in chat.tool_calls_of(list(example.messages)):
        fn, text = call["function"], result["content"]
        if fn["name"] == "grep":
            for m in re.finditer(r"^(svcs/[^:]+):(\d+):", text, re.MULTILINE):
                shown.setdefault(m[1], set()).add(int(m[2]))
        else:
            lines = {int(n) for n in re.findall(r"^(\d+): ", text, re.MULTILINE)}
            shown.setdefault(fn["arguments"]["path"], set()).update(lines)
    return shown


def _svcs_api_names() -> set[str]:
    """Dotted names svcs defines (modules, classes, functions, methods, module constants)."""
    pkg = SITE / "svcs"
    names, defs_by_module = set(), {}
    for file in pkg.glob("*.py"):
        defs: set[str] = set()

        def walk(node: ast.AST, prefix: str, defs: set[str] = defs) -> None:
            for n in ast.iter_child_nodes(node):
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    defs.add(prefix + n.name)
                    if isinstance(n, ast.ClassDef):
                        walk(n, f"{prefix}{n.name}.")
                elif not prefix and isinstance(n, ast.Assign | ast.AnnAssign):
                    targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                    defs.update(t.id for t in targets if isinstance(t, ast.Name))

        walk(ast.parse(file.read_text(encoding="utf-8")), "")
        defs_by_module[file.stem] = defs
        if file.stem != "__init__":
            names.add(f"svcs.{file.stem}")
            names.update(f"svcs.{file.stem}.{d}" for d in defs)
    # Re-exports such as `from ._core import Container` make `svcs.Container.get` valid.
    for node in ast.walk(ast.parse((pkg / "__init__.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                for d in defs_by_module[node.module]:
                    if d == alias.name or d.startswith(alias.name + "."):
                        names.add(f"svcs.{d}")
    return names


# --- the shipped file --------------------------------------------------------------------


def test_shipped_file_loads_with_all_kinds(shipped: list[Example]) -> None:
    assert len(shipped) >= 40
    counts = Counter(ex.kind for ex in shipped)
    assert set(counts) == HANDWRITTEN_KINDS
    assert min(counts.values()) >= 10, counts
    for ex in shipped:
        assert (ex.source, ex.commit, ex.generator_version) == ("svcs", "", HANDWRITTEN_VERSION)
        assert isinstance(ex.messages, tuple) and isinstance(ex.tools, tuple)
        assert ex.messages[0] == chat.system("svcs")
        assert list(ex.tools) == list(tools.TOOL_SCHEMAS)


def test_shipped_tool_results_replay_on_installed_svcs(shipped: list[Example]) -> None:
    bad = {i: replay_mismatches(ex, SITE) for i, ex in enumerate(shipped)}
    assert {i: idx for i, idx in bad.items() if idx} == {}


def test_shipped_tool_calls_stay_inside_svcs(shipped: list[Example]) -> None:
    # site-packages holds other packages; the svcs snapshot holds only svcs/.
    for ex in shipped:
        for fn in _calls(ex):
            path = fn["arguments"].get("path", ".")
            assert path == "svcs" or path.startswith("svcs/"), (ex.messages[1], fn)


def test_shipped_answers_cite_only_lines_the_tools_showed(shipped: list[Example]) -> None:
    for ex in shipped:
        answer = ex.messages[-1]["content"]
        cited = CITATION.findall(answer)
        if ex.kind == "handwritten_direct":
            assert not cited, f"direct answer cites lines it never saw: {cited}"
            continue
        shown = _shown_lines(ex)
        for path, first, last in cited:
            for n in {int(first), int(last or first)}:
                assert n in shown.get(path, set()), (ex.messages[1]["content"], path, n)


def test_shipped_answers_name_only_real_svcs_api(shipped: list[Example]) -> None:
    known = _svcs_api_names()
    for ex in shipped:
        prose = FENCED.sub("", ex.messages[-1]["content"])
        unknown = set(API_NAME.findall(prose)) - known
        assert not unknown, (ex.messages[1]["content"], unknown)


def test_shipped_meta_spans_exist(shipped: list[Example]) -> None:
    for ex in shipped:
        file = SITE / ex.path
        assert file.is_file(), ex.path
        n_lines = len(file.read_text(encoding="utf-8").splitlines())
        assert 1 <= ex.start_line <= ex.end_line <= n_lines, (ex.path, ex.start_line, ex.end_line)


def test_shipped_read_examples_read_their_meta_span(shipped: list[Example]) -> None:
    for ex in shipped:
        if ex.kind != "handwritten_read":
            continue
        fn = _calls(ex)[-1]
        assert fn["name"] == "read_file"
        assert fn["arguments"] == {
            "path": ex.path,
            "start_line": ex.start_line,
            "end_line": ex.end_line,
        }


def test_shipped_questions_are_unique(shipped: list[Example]) -> None:
    questions = Counter(ex.messages[1]["content"] for ex in shipped)
    assert [q for q, n in questions.items() if n > 1] == []


# --- the loader --------------------------------------------------------------------------


def _record(root: Path) -> dict[str, Any]:
    """A valid grep example over a one-file tree."""
    args = {"pattern": "def f", "path": "pkg"}
    return {
        "messages": [
            chat.system("pkg"),
            chat.user("Where is f?"),
            chat.tool_call("call_1", "grep", args),
            chat.tool_result("call_1", "grep", tools.execute(root, "grep", args)),
            chat.assistant("`pkg/m.py:1`."),
        ],
        "tools": list(chat.tool_schemas()),
        "meta": {"source": "pkg", "path": "pkg/m.py", "kind": "handwritten_grep"},
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "m.py").write_text("def f():\n    return 1\n")
    return tmp_path / "src"


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


def _string_arguments(r: dict[str, Any]) -> dict[str, Any]:
    call = r["messages"][2]["tool_calls"][0]["function"]
    call["arguments"] = json.dumps(call["arguments"])
    return r


def _unknown_tool(r: dict[str, Any]) -> dict[str, Any]:
    r["messages"][2]["tool_calls"][0]["function"]["name"] = "run_shell"
    return r


def _orphan_result(r: dict[str, Any]) -> dict[str, Any]:
    r["messages"][3]["tool_call_id"] = "call_9"
    r["messages"][2]["tool_calls"][0]["id"] = "call_9x"
    return r


MALFORMED = {
    "bad json": ('{"messages": [', "not valid JSON"),
    "not an object": ("[1, 2]", "must be a JSON object"),
    "missing messages": (lambda r: _without(r, "messages"), "missing keys ['messages']"),
    "missing meta": (lambda r: _without(r, "meta"), "missing keys ['meta']"),
    "unknown key": (lambda r: {**r, "meat": {}}, "unknown keys ['meat']"),
    "unknown tool": (_unknown_tool, "unknown tool"),
    "string arguments": (_string_arguments, "arguments must be a JSON object"),
    "last not an answer": (
        lambda r: {**r, "messages": r["messages"][:4]},
        "last message must be a final assistant answer",
    ),
    "tool result with no call": (_orphan_result, "answers no earlier tool call"),
    "meta without kind": (
        lambda r: {**r, "meta": _without(r["meta"], "kind")},
        "meta.kind must be a non-empty string",
    ),
    "unknown kind": (
        lambda r: {**r, "meta": {**r["meta"], "kind": "grep_class"}},
        "meta.kind 'grep_class' is not one of",
    ),
    "bool line": (
        lambda r: {**r, "meta": {**r["meta"], "start_line": True}},
        "meta.start_line must be a positive integer",
    ),
    "span backwards": (
        lambda r: {**r, "meta": {**r["meta"], "start_line": 5, "end_line": 2}},
        "meta.end_line 2 is before start_line 5",
    ),
    "direct with tools": (
        lambda r: {**r, "meta": {**r["meta"], "kind": "handwritten_direct"}},
        "must answer without tools",
    ),
    "read without read_file": (
        lambda r: {**r, "meta": {**r["meta"], "kind": "handwritten_read"}},
        "must call 'read_file'",
    ),
    "tool_calls not a list": (
        lambda r: {**r, "messages": [*r["messages"][:2], {**r["messages"][2], "tool_calls": 5}, *r["messages"][3:]]},
        "",
    ),
    "undeclared tool": (
        lambda r: {**r, "tools": list(chat.tool_schemas())[1:]},
        "that 'tools' does not declare",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_line_names_file_and_line(case: str, root: Path, tmp_path: Path) -> None:
    bad, expected = MALFORMED[case]
    good = json.dumps(_record(root))
    line = bad if isinstance(bad, str) else json.dumps(bad(_record(root)))
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(ValueError) as info:
        load_handwritten(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: "), message
    assert expected in message


def test_load_defaults_lines_and_skips_blank_lines(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_text("\n" + json.dumps(_record(root)) + "\n\n")
    [ex] = load_handwritten(path)
    assert (ex.path, ex.start_line, ex.end_line, ex.kind) == ("pkg/m.py", 1, 1, "handwritten_grep")
    assert ex.record() == {"messages": _record(root)["messages"], "tools": list(tools.TOOL_SCHEMAS)}


def test_load_rejects_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        load_handwritten(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError):
        load_handwritten(tmp_path / "absent.jsonl")


# --- replay and refill -------------------------------------------------------------------


def test_replay_mismatches_points_at_stale_results(root: Path) -> None:
    record = _record(root)
    # Any Example replays, not only hand-written ones; string arguments run as the model sent them.
    record["messages"][2]["tool_calls"][0]["function"]["arguments"] = '{"pattern": "def f"}'
    example = Example(
        tuple(record["messages"]),
        tuple(record["tools"]),
        "pkg",
        "abc",
        "pkg/m.py",
        1,
        2,
        "grep_function",
        "7",
    )
    assert replay_mismatches(example, root) == []
    (root / "pkg" / "m.py").write_text("\n\ndef f():\n    return 1\n")
    assert replay_mismatches(example, root) == [3]
    orphan = Example(
        example.messages + (chat.tool_result("call_x", "grep", "x"),),
        example.tools,
        "pkg",
        "",
        "pkg/m.py",
        1,
        1,
        "handwritten_grep",
        "1",
    )
    assert replay_mismatches(orphan, root) == [3, 5]


def test_refill_adds_missing_results_and_fixes_stale_ones(root: Path) -> None:
    record = _record(root)
    record["messages"][3]["content"] = "stale"
    read = {"path": "pkg/m.py", "start_line": 1, "end_line": 1}
    record["messages"][4:4] = [chat.tool_call("call_2", "read_file", read)]
    record["tools"] = []
    new = refill_tool_results(record, root)
    assert [m["role"] for m in new["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
        "assistant",
    ]
    assert new["messages"][3]["content"] == "pkg/m.py:1:def f():"
    assert new["messages"][5] == chat.tool_result("call_2", "read_file", "1: def f():")
    assert new["tools"] == list(tools.TOOL_SCHEMAS)
    assert record["messages"][3]["content"] == "stale"  # the input is left alone


def test_fill_script_rewrites_in_place_then_checks_clean(root: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "fill_tool_results", REPO / "scripts" / "fill_tool_results.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    record = _record(root)
    record["messages"][3]["content"] = "stale"
    path = tmp_path / "draft.jsonl"
    path.write_text(json.dumps(record) + "\n")
    path.chmod(0o644)
    argv = [str(path), "--root", str(root)]
    assert script.main([*argv, "--check"]) == 1
    assert script.main(argv) == 0
    assert script.main([*argv, "--check"]) == 0
    [ex] = load_handwritten(path)
    assert replay_mismatches(ex, root) == []
    assert list(tmp_path.glob(".draft.jsonl.*")) == []  # no temp file left behind
    assert path.stat().st_mode & 0o777 == 0o644
