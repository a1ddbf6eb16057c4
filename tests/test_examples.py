"""Python example generators on real code (this project's own package): every call's
arguments are on screen before the call, answers restate what the tools showed, and a
repository fact never comes without a call."""

import json
import re
from pathlib import Path

import pytest

import codeadapt
from codeadapt import examples, tools
from codeadapt.extract import extract_checkout

ROOT = Path(codeadapt.__file__).parent


@pytest.fixture(scope="module")
def made() -> list:
    ext = extract_checkout(ROOT, "codeadapt", "0" * 40)
    out, stats = examples.python_examples(ROOT, ext, {"grep": 12, "read": 12, "explain": 8})
    assert stats["examples"] == len(out) > 20
    return out


def _calls(ex) -> list[tuple[str, dict, str]]:
    msgs = ex.messages
    return [(m["tool_calls"][0]["function"]["name"], m["tool_calls"][0]["function"]["arguments"],
             msgs[i + 1]["content"]) for i, m in enumerate(msgs) if m.get("tool_calls")]


def test_every_result_replays_and_every_read_starts_at_a_grep_hit(made) -> None:
    reads = 0
    for ex in made:
        seen = ex.messages[1]["content"]
        for name, args, result in _calls(ex):
            assert tools.execute(ROOT, name, args) == result
            if name == "read_file":
                reads += 1
                assert set(args) == {"path", "start_line"}
                assert f"{args['path']}:{args['start_line']}:" in seen  # on screen before the call
            seen += "\n" + json.dumps(args) + "\n" + result
    assert reads >= 15


def test_show_answers_quote_the_code_that_was_read(made) -> None:
    shows = [ex for ex in made if ex.kind.startswith("read_")]
    assert shows
    for ex in shows:
        answer, read = ex.messages[-1]["content"], _calls(ex)[-1][2]
        code = answer.split("```python\n", 1)[1].rsplit("\n```", 1)[0]
        assert code.splitlines()[0].strip() in read
        assert f"lines {ex.start_line}–{ex.end_line}" in answer


def test_explanations_look_the_symbol_up_first(made) -> None:
    expl = [ex for ex in made if ex.kind == "explain_symbol"]
    assert expl
    for ex in expl:
        assert [c[0] for c in _calls(ex)] == ["grep", "read_file"]
        assert ex.messages[-1]["content"].rstrip().endswith((".", "!", "?"))


def test_no_repository_fact_without_a_call(made) -> None:
    assert all(_calls(ex) for ex in made)


@pytest.mark.parametrize("doc, want", [
    ("Return the :class:`~a.b.Thing` for ``x``.\n\nMore.", "Return the `Thing` for `x`."),
    ("Use :func:`pkg.run`.", "Use `pkg.run`."),
    ("One. " * 100, ("One. " * 80).strip()),
    ("x" * 500, ""),  # no sentence end within the limit: nothing rather than a cut sentence
])
def test_clean_doc(doc: str, want: str) -> None:
    assert examples.clean_doc(doc) == want


def test_test_examples_use_wordings_no_train_example_uses() -> None:
    from codeadapt import wordings
    from codeadapt.card import question_form
    from codeadapt.dataset import split_of

    split = (0.1, 0.4, "salt")
    ext = extract_checkout(ROOT, "codeadapt", "0" * 40)
    made, _ = examples.python_examples(ROOT, ext, {"grep": 30, "read": 12, "explain": 8},
                                       examples.Limits(40, 20, split))
    forms: dict[str, set[str]] = {"train": set(), "test": set()}
    for ex in made:
        s = split_of(ex.source, ex.path, *split)
        q = ex.messages[1]["content"]
        allowed = wordings.WORDINGS[ex.kind]
        allowed = allowed[-wordings.TEST_ONLY:] if s == "test" else allowed[:-wordings.TEST_ONLY]
        assert any(re.fullmatch(re.escape(w).replace(r"\{name\}", ".+").replace(r"\{repo\}", "codeadapt"), q)
                   for w in allowed), (s, q)
        forms.setdefault(s, set()).add(question_form(q, ex.source))
    assert forms["test"] and forms["train"] and not forms["test"] & forms["train"]
