"""Agentic evaluation: tasks from held-out conversations, a tool loop on the real checkout,
final answers scored against ground truth. Generators here are rules and scripted replies, so
the loop itself is what is tested; the model path shares evaluate's generation."""

import json
from pathlib import Path

import pytest

import codeadapt
from codeadapt import agentic
from codeadapt.examples import python_examples
from codeadapt.extract import extract_checkout
from codeadapt.prompts import prompts_of

ROOT = Path(codeadapt.__file__).parent


@pytest.fixture(scope="module")
def tasks() -> list[agentic.Task]:
    ext = extract_checkout(ROOT, "codeadapt", "0" * 40)
    made, _ = python_examples(ROOT, ext, {"grep": 12, "read": 6, "explain": 6})
    ps = []
    for i, ex in enumerate(made):
        ps += prompts_of({"messages": list(ex.messages), "tools": list(ex.tools)}, f"e{i:02d}",
                         "codeadapt", ex.kind, str(ROOT), cluster=f"codeadapt/{ex.path}")
    return agentic.tasks_from_prompts(ps)


def _call(name: str, args: dict) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


def test_every_conversation_with_a_final_answer_is_a_task(tasks) -> None:
    assert len(tasks) >= 20 and all(t.gold_calls >= 1 and t.question for t in tasks)


def test_rules_solve_tasks_with_the_real_tools(tasks) -> None:
    outcomes = agentic.run_tasks(tasks, agentic.rules_generator(), max_calls=3)
    summary = agentic.summarize_tasks(tasks, outcomes)["all"]
    assert summary["n"] == len(tasks) and 0.3 <= summary["success"] <= 1.0
    assert 1 <= summary["calls_per_task"] <= 3
    by_kind = agentic.summarize_tasks(tasks, outcomes)["by_kind"]
    assert by_kind == {k: [sum(o.success for t, o in zip(tasks, outcomes) if agentic.kind_name(t) == k), n]
                       for k, n in agentic.kinds_of(tasks).items()}
    assert sum(k for k, _ in by_kind.values()) == summary["k"] and len(by_kind) >= 2
    # Each transcript starts with the question and its tool results are what the tool returns.
    o = outcomes[0]
    assert o.transcript[0]["role"] == "user" and o.transcript[-1]["role"] == "tool"


def test_hostile_and_endless_callers_end_as_failures_not_crashes(tasks) -> None:
    replies = iter([_call("grep", {"pattern": "("}), "<tool_call>{not json</tool_call>",
                    _call("read_file", {"path": "../../etc/passwd"}), _call("rm", {"path": "."})] * 50)
    outcomes = agentic.run_tasks(tasks[:3], lambda convs, tools, ids: [next(replies) for _ in convs], 3)
    assert all(not o.success and o.failure == "too_many_calls" for o in outcomes)
    assert all(o.invalid_calls == o.calls == 3 for o in outcomes)


def test_streamed_tasks_end_as_in_rounds(tasks) -> None:
    """Asserts: without rounds (`stream`: each task's next turn as soon as its call ran, turns
    of different tasks interleaved in another order) every task ends with the same calls,
    transcript, answer and score as in rounds, given the same reply per task and turn."""
    picked = tasks[:6]
    rules = agentic.rules_generator()

    def reply(conv: list, tools: tuple) -> str:  # rules, but one task calls until it is stopped
        if "?" in conv[1]["content"] and conv[1]["content"] == picked[2].question:
            return _call("grep", {"pattern": "def"})
        return rules([conv], [tools], ["x"])[0]

    rounds = agentic.run_tasks(picked, lambda cs, ts, ids: [reply(c, t) for c, t in zip(cs, ts)], 3)

    def stream(convs, tools, turn) -> None:
        pending = list(range(len(convs)))[::-1]  # the last task first, follow-ups at the back
        while pending:
            i = pending.pop(0)
            nxt = turn(i, reply(convs[i], tools[i]))
            if nxt is not None:
                convs[i] = nxt
                pending.append(i)

    streamed = agentic.run_tasks(picked, None, 3, stream=stream)
    key = lambda o: (o.success, o.calls, o.invalid_calls, o.answer, o.failure, o.transcript)  # noqa: E731
    assert [key(o) for o in streamed] == [key(o) for o in rounds]
    assert max(o.calls for o in rounds) == 3 and rounds[2].failure == "too_many_calls"
    assert any(o.success for o in rounds) and all(o.seconds >= 0 for o in streamed)


def test_set_answers_are_scored_by_precision_and_recall() -> None:
    t = agentic.Task("t", "s", "grep_subclasses", ".", {"role": "system", "content": ""}, "q?",
                     "2 classes subclass `A`:\n- `B` (`a.py`, line 3)\n- `C` (`b.py`, line 9)", 1,
                     (), "c")
    ok = agentic.score_answer(t, "- `B` (`a.py`, line 3)\n- `C` (`b.py`, line 9)")
    assert ok[0] and ok[2:] == (1.0, 1.0)
    half = agentic.score_answer(t, "- `B` (`a.py`, line 3)")
    assert not half[0] and half[2:] == (1.0, 0.5)
    noisy = agentic.score_answer(t, "- `B` (`a.py`, line 3)\n- `C` (`b.py`, line 9)\n- `D` (`c.py`, line 1)\n- `E` (`d.py`, line 2)")
    assert not noisy[0] and noisy[2] == 0.5


def test_mixed_tasks_split_the_budget_across_files_and_repositories(tasks) -> None:
    files, repos = tasks[:10], tasks[10:13]
    mixed = agentic.mix_tasks([files, repos], 8)
    assert len(mixed) == 8 and sum(t in repos for t in mixed) == 3  # the short pool gives all it has
    assert agentic.mix_tasks([files, []], 4) == agentic.sample_tasks(files, 4)
    assert agentic.mix_tasks([files, repos], 8) == mixed  # stable


def test_the_sample_survives_a_change_of_answer_text(tasks) -> None:
    """A generator change that rewrites answers (so every example id) keeps the questions, and
    versions must be compared on the same ones: the sample is drawn by repository + question."""
    from dataclasses import replace

    reworded = [replace(t, id=f"v9-{t.id}", expected=t.expected + " (reworded)") for t in tasks]
    before = [t.question for t in agentic.sample_tasks(tasks, 7)]
    assert [t.question for t in agentic.sample_tasks(reworded, 7)] == before
    assert len(set(before)) == 7
