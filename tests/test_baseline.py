"""The rule baseline: it reads only the visible conversation, is scored by the same scorer as
the models, and never crashes on what a tool or a user wrote."""

from pathlib import Path

import pytest

import codeadapt
from codeadapt import baseline, chat
from codeadapt.config import EvalSpec
from codeadapt.evaluate import evaluate_rules
from codeadapt.examples import python_examples
from codeadapt.extract import extract_checkout
from codeadapt.prompts import prompts_of

ROOT = Path(codeadapt.__file__).parent


@pytest.fixture(scope="module")
def prompts() -> list:
    ext = extract_checkout(ROOT, "codeadapt", "0" * 40)
    made, _ = python_examples(ROOT, ext, {"grep": 12, "read": 8, "explain": 6})
    out = []
    for i, ex in enumerate(made):
        record = {"messages": list(ex.messages), "tools": list(ex.tools)}
        out += prompts_of(record, f"e{i}", "codeadapt", ex.kind, str(ROOT))
    return out


def test_rules_are_scored_like_a_model_and_find_most_definitions(prompts) -> None:
    result = evaluate_rules(prompts, EvalSpec(max_tokens=96))
    assert result["prompts"] == len(prompts) and result["model"] == "rules"
    by_kind: dict[str, list[bool]] = {}
    for r in result["results"]:
        if r["expected"]["name"]:
            by_kind.setdefault(r["kind"], []).append(r["score"]["correct"])
    # "where is X" and "show X" questions name X: the rule's search finds the same lines.
    for kind in ("grep_class", "grep_function", "read_function", "read_class", "read_method"):
        if kind in by_kind:
            assert sum(by_kind[kind]) >= len(by_kind[kind]) / 2, (kind, by_kind[kind])
    assert 0 < result["metrics"]["tool_call"]["accuracy"] < 1


def test_rules_read_the_hit_only_when_asked_to_show() -> None:
    grep_turn = [chat.system("r"), chat.user("Show me the function `run` in r."),
                 chat.tool_call("c1", "grep", {"pattern": "x"}),
                 chat.tool_result("c1", "grep", "pkg/a.py:4:async def run():")]
    assert '"start_line": 4' in baseline.rule_output(grep_turn)
    grep_turn[1] = chat.user("Where is `run` defined?")
    assert baseline.rule_output(grep_turn) == "`run` is in `pkg/a.py` at line 4."


def test_rules_name_what_each_hit_defines() -> None:
    """A subclass search answers with the subclasses' names, which the expected list holds,
    not the base the question names."""
    from codeadapt.agentic import Task, score_answer

    hits = "a.py:3:class B(A):\nb.py:9:class C(mod.A):"
    msgs = [chat.system("r"), chat.user("Which classes subclass `A`?"),
            chat.tool_call("c1", "grep", {"pattern": "x"}), chat.tool_result("c1", "grep", hits)]
    answer = baseline.rule_output(msgs)
    task = Task("t", "s", "grep_subclasses", ".", chat.system("r"), "Which classes subclass `A`?",
                "Classes that subclass `A`:\n- `B` (`a.py`, line 3)\n- `C` (`b.py`, line 9)\n\n2 classes in all.",
                1, (), "c")
    assert score_answer(task, answer)[0], answer
    msgs[-1] = chat.tool_result("c1", "grep", "a.py:3:class B(A):")
    assert baseline.rule_output(msgs) == "`B` is in `a.py` at line 3."


@pytest.mark.parametrize("question, tool_text", [
    ("", None), ("``", None), ("@@@ ((( `[`", None), ("What about `a.b.`?", None),
    ("Show me `x`.", "error: no such file"), ("Show me `x`.", "No matches."),
    ("Show me `x`.", "1: \n2: \"\"\""), ("Which images in a.html lack alt?", None),
])
def test_rules_never_crash(question: str, tool_text: str | None) -> None:
    msgs = [chat.system("r"), chat.user(question)]
    if tool_text is not None:
        name = "read_file" if tool_text.startswith("1:") else "grep"
        msgs += [chat.tool_call("c1", name, {"path": "a.py"} if name == "read_file" else {"pattern": "x"}),
                 chat.tool_result("c1", name, tool_text)]
    assert isinstance(baseline.rule_output(msgs), str)


def test_a_stored_result_scores_the_same_again_and_refuses_other_prompts(prompts) -> None:
    from codeadapt.evaluate import rescore

    spec = EvalSpec(max_tokens=96)
    first = evaluate_rules(prompts, spec)
    again = rescore(first, prompts, spec)
    assert again["metrics"] == first["metrics"] and again["results"] == first["results"]
    fewer = rescore(first, prompts[1:], spec)  # an item excluded since: scored without it
    assert fewer["prompts"] == len(prompts) - 1
    with pytest.raises(ValueError, match="other prompts"):
        rescore({**first, "results": first["results"][1:]}, prompts, spec)


def test_scores_are_also_split_by_whether_the_repository_was_trained_on(prompts) -> None:
    from dataclasses import replace

    mixed = [replace(p, held_out=i % 3 == 0) for i, p in enumerate(prompts)]
    result = evaluate_rules(mixed, EvalSpec(max_tokens=96))
    by = result["metrics_by_origin"]
    calls = [r for r in result["results"] if r["expected"]["name"]]
    for origin, held in (("trained_repos", False), ("held_out_repos", True)):
        mine = [r["score"]["correct"] for r in calls if r["held_out"] == held]
        assert by[origin]["tool_call"]["n"] == len(mine) and by[origin]["tool_call"]["k"] == sum(mine)
    assert "held_out_repos" not in evaluate_rules(prompts, EvalSpec(max_tokens=96))["metrics_by_origin"]


def test_rules_search_a_described_behaviour_and_answer_follow_ups_from_the_read() -> None:
    q = "Which function in r parses the request body into form fields?"
    first = baseline.rule_output([chat.system("r"), chat.user(q)])
    assert '"pattern": "request body"' in first  # the longest pair of plain words, not the repo
    assert baseline.described("print pick from codeadapt") is None  # short: names something
    assert baseline.described("Where is `parse_body` defined in r, please tell me?") is None
    read = "9: @cached\n10: def parse_body(self, raw: bytes, *, limit: int = 10) -> dict:\n11:     pass"
    msgs = [chat.system("r"), chat.user("Show me `parse_body`."),
            chat.tool_call("c1", "read_file", {"path": "a.py", "start_line": 10}),
            chat.tool_result("c1", "read_file", read), chat.assistant("..."), chat.user("What are its arguments?")]
    assert baseline.rule_output(msgs) == ("`parse_body` takes 3 parameters: `self`, `raw: bytes`, "
                                          "`limit: int = 10`.")
    msgs[-1] = chat.user("Is it decorated?")
    assert baseline.rule_output(msgs) == "Yes: `parse_body` is decorated with `@cached`."
