"""Token budget at build time: long examples are cut (marked, replayable) or dropped here,
never by the trainer. A character counter stands in for the tokenizer in the unit tests; the
real SmolLM2 tokenizer is used in test_gguf."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from codeadapt import budget, chat, tools
from codeadapt.dataset import build_dataset
from codeadapt.records import Checkout, Example


def chars(messages, tool_list) -> int:
    return sum(len(str(m.get("content") or "")) + len(str(m.get("tool_calls") or "")) for m in messages)


def read_example(root: Path, answer: str) -> Example:
    args = {"path": "big.py", "start_line": 1}
    msgs = (chat.system("src"), chat.user("show me f"), chat.tool_call("call_1", "read_file", args),
            chat.tool_result("call_1", "read_file", tools.execute(root, "read_file", args)),
            chat.assistant(answer))
    return Example(msgs, chat.tool_schemas(), "src", "c0ffee", "big.py", 1, 60, "read_function", "1")


def repo(tmp_path: Path) -> Path:
    (tmp_path / "big.py").write_text("def f():\n" + "".join(f"    x{i} = {i}\n" for i in range(59)))
    return tmp_path


def test_short_example_is_untouched(tmp_path: Path) -> None:
    ex = read_example(repo(tmp_path), "`f` starts with `def f():`.")
    got, n, how = budget.fit(ex, chars, 10_000)
    assert got is ex and how == "fits" and n == chars(ex.messages, ex.tools)


def test_long_result_is_cut_marked_and_still_replays(tmp_path: Path) -> None:
    root = repo(tmp_path)
    ex = read_example(root, "It starts:\n```python\ndef f():\n    x0 = 0\n```")
    limit = chars(ex.messages, ex.tools) // 2
    got, n, how = budget.fit(ex, chars, limit)
    assert how == "cut" and n <= limit and got is not None
    shown = got.messages[3]["content"]
    assert "cut to fit the context" in shown.splitlines()[-1] and "1: def f():" in shown
    one_more = chat.cut_lines(ex.messages[3]["content"].splitlines(), len(shown.splitlines()))
    assert chars([*got.messages[:3], {**got.messages[3], "content": one_more}, got.messages[4]],
                 ex.tools) > limit  # as many whole lines as fit
    assert chat.replay_mismatches(got.messages, root) == []
    # A forged cut (wrong count, or lines that are not the real head) does not replay.
    for bad in (shown.replace(shown.splitlines()[-1], chat.CUT_MARK.format(n=3)),
                shown.replace("x0 = 0", "x0 = 1")):
        forged = (*got.messages[:3], {**got.messages[3], "content": bad}, got.messages[4])
        assert chat.replay_mismatches(forged, root) == [3]


def test_answer_quoting_cut_lines_is_dropped(tmp_path: Path) -> None:
    ex = read_example(repo(tmp_path), "It ends with `x58 = 58`.")
    got, _, how = budget.fit(ex, chars, chars(ex.messages, ex.tools) // 2)
    assert got is None and how.startswith("dropped_over_token_budget")


def test_build_applies_the_budget_and_reports_it(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "r").mkdir()
    root = repo(tmp_path / "r")
    exs = [read_example(root, "It starts with `def f():`."), read_example(root, "It ends with `x58 = 58`.")]
    limit = chars(exs[0].messages, exs[0].tools) // 2
    monkeypatch.setattr(budget, "load_counter", lambda d: (chars, lambda m, t: "RENDERED",
                                                           lambda convs: [chars(m, t) for m, t in convs]))
    import codeadapt.dataset as ds
    monkeypatch.setattr(ds, "load_counter", budget.load_counter)
    co = Checkout("src", "path", "x", "snapshot", "c0ffee", str(root), "g", "python")
    m = build_dataset("p", exs, {"src": co}, tmp_path / "out", {"valid": 0, "test": 0, "salt": "s"},
                      {"sources": {}}, {}, budget.Budget(str(tmp_path / "tok-abc"), limit))
    assert m["counts"]["total"] == 1 and m["examples"][0]["tokens"] <= limit
    assert m["stats"]["build"]["cut_to_token_budget"] == 1
    assert m["stats"]["build"]["dropped_over_token_budget_answer_needs_cut_lines[read_function]"] == 1
    assert m["inputs"]["token_budget"] == {"tokenizer": "tok-abc", "max_tokens": limit}
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"Budget {limit}" in card and "RENDERED" in card and "read_function #1" in card


def test_samples_are_stable_and_per_kind() -> None:
    items = [("a", i) for i in range(10)] + [("b", 1)]
    assert budget.samples(items, 3, "s") == budget.samples(items, 3, "s")
    got = budget.samples(items, 3, "s")
    assert len(got["a"]) == 3 and got["b"] == [1]
    assert Counter(len(v) for v in got.values()) == Counter({3: 1, 1: 1})
