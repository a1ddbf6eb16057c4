"""Python example generators on real code (this project's own package): every call's
arguments are on screen before the call, answers restate what the tools showed, and a
repository fact never comes without a call."""

import json
import re
from pathlib import Path

import pytest

import codeadapt
from codeadapt import examples, tools
from codeadapt.agentic import SET_KINDS
from codeadapt.extract import extract_checkout

ROOT = Path(codeadapt.__file__).parent


@pytest.fixture(scope="module")
def made() -> list:
    ext = extract_checkout(ROOT, "codeadapt", "0" * 40)
    out, stats = examples.python_examples(ROOT, ext, {"grep": 12, "read": 18, "explain": 12})
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
        code = answer.split("```\n", 1)[1].rsplit("\n```", 1)[0]
        # verbatim: the first lines of the result, numbers and indentation as the tool printed
        assert read.startswith(code) and code.splitlines()[0].startswith(f"{ex.start_line}: ")
        assert f"`{ex.path}` at line {ex.start_line}" in answer and "–" not in answer.split("\n")[0]


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


def test_test_examples_use_wordings_no_train_example_uses(monkeypatch) -> None:
    from codeadapt import wordings
    from codeadapt.card import question_form
    from codeadapt.dataset import split_of

    monkeypatch.setattr(wordings, "TYPO_RATE", 0.0)  # exact wordings; typos are tested apart
    split = (0.1, 0.4, "salt")
    ext = extract_checkout(ROOT, "codeadapt", "0" * 40)
    made, _ = examples.python_examples(ROOT, ext, {"grep": 30, "read": 12, "explain": 8},
                                       examples.Limits(40, 20, split))
    forms: dict[str, set[str]] = {"train": set(), "test": set()}
    for ex in made:
        s = split_of(ex.source, ex.path, *split)
        q = ex.messages[1]["content"]
        # Multi-step kinds open with a "where is X defined?" question.
        asked = {"grep_refine": ("grep_class", "grep_function"), "followup_read": ("grep_class", "grep_function"),
                 "followup_params": ("read_function", "read_method"),
                 "followup_decorated": ("read_class", "read_function", "read_method")}.get(ex.kind, (ex.kind,))
        allowed = [w for k in asked for w in (wordings.WORDINGS[k][-wordings.TEST_ONLY:] if s == "test"
                                              else wordings.WORDINGS[k][:-wordings.TEST_ONLY])]
        assert any(re.fullmatch(re.sub(r"\\\{(name|did|does)\\\}", ".+", re.escape(w)).replace(r"\{repo\}", "codeadapt"), q)
                   for w in allowed), (s, q)
        if ex.kind.startswith("followup_") and ex.kind != "followup_read":  # so is the follow-up
            follow = wordings.WORDINGS[ex.kind]
            assert ex.messages[-2]["content"] in (follow[-wordings.TEST_ONLY:] if s == "test"
                                                  else follow[:-wordings.TEST_ONLY])
        forms.setdefault(s, set()).add(question_form(q, ex.source))
    assert forms["test"] and forms["train"] and not forms["test"] & forms["train"]


def test_typos_swap_letters_of_plain_words_only() -> None:
    import random

    from codeadapt import wordings

    t = "Where is the class `{name}` defined in {repo}?"
    seen = {wordings.typo(t, random.Random(i)) for i in range(200)}
    assert t not in seen or len(seen) > 5
    for s in seen:
        assert "`{name}`" in s and "{repo}" in s and sorted(s) == sorted(t) and len(s) == len(t)
        assert sum(a != b for a, b in zip(s, t)) in (0, 2)
    assert wordings.typo("`{name}`?", random.Random(0)) == "`{name}`?"
    rate = sum(wordings.pick("grep_class", random.Random(i), name="X", repo="r") not in
               {w.format(name="X", repo="r") for w in wordings.WORDINGS["grep_class"]} for i in range(2000))
    assert 50 < rate < 150  # ~5 %


def test_multi_step_kinds_are_made_and_replay(made) -> None:
    kinds = {ex.kind for ex in made}
    assert {"followup_read", "grep_refine", "find_behaviour", "followup_params", "followup_decorated"} <= kinds


def test_behaviour_questions_name_nothing_and_the_read_shows_the_enclosing_definition(made) -> None:
    found = [e for e in made if e.kind == "find_behaviour"]
    assert len(found) >= 3 and any(len(_calls(e)) == 3 for e in found)  # some recover from a miss
    sym = {(s.path, s.def_line): s for s in extract_checkout(ROOT, "codeadapt", "0" * 40).symbols()}
    for ex in found:
        q, answer = ex.messages[1]["content"], ex.messages[-1]["content"]
        *missed, (g, gargs, gres), (r, rargs, rres) = _calls(ex)
        for _, args, result in missed:  # the question's opening words, which the code lacks
            assert result == "No matches." and args["pattern"] in q and args["pattern"] != gargs["pattern"]
        name = re.match(r"The (?:function|method) `(\w+)`", answer)[1]
        assert name not in q and f"`{ex.path}`" in answer
        assert gargs["pattern"] in q and len(gres.splitlines()) == 1  # a phrase of the question, one hit
        line = int(re.search(r"line (\d+)", answer)[1])
        assert sym[(ex.path, line)].name == name and re.search(rf"^{line}: .*\b(def|class) {name}\b", rres, re.M)
        assert sym[(ex.path, line)].docstring.split()[1] in answer  # quotes what was read
        # read from the hit's own line: the tool shows the definition that holds it, from its top
        hit = int(gres.split(":")[1])
        assert rargs == {"path": ex.path, "start_line": hit} and int(rres.split(":")[0]) <= line < hit


def test_followups_are_answered_from_the_read_without_a_new_call(made) -> None:
    from codeadapt.trajectories import describe

    answers = {"yes": 0, "no": 0}
    for ex in (e for e in made if e.kind in ("followup_params", "followup_decorated")):
        roles = [m["role"] for m in ex.messages]
        assert roles[-3:] == ["assistant", "user", "assistant"] and not ex.messages[-1].get("tool_calls")
        assert [c[0] for c in _calls(ex)] == ["grep", "read_file"]
        read, answer = _calls(ex)[-1][2], ex.messages[-1]["content"]
        for item in re.findall(r"`([^`]+)`", answer)[1:]:  # every parameter / decorator named was on screen
            assert " ".join(item.split()) in " ".join(read.split()), (item, read)
        if ex.kind == "followup_decorated":
            answers["yes" if answer.startswith("Yes") else "no"] += 1
            assert answer.startswith("Yes") == any(ln.split(": ", 1)[1].lstrip().startswith("@")
                                                  for ln in read.splitlines()[:3] if ": " in ln)
    assert answers["yes"] and answers["no"]
    assert describe("Return the app.", "x") is None  # too short to describe anything
    assert describe("Returns the current application context, or None.", "get")[:2] == (
        "return the current application context, or None", "returns the current application context, or None")
    assert describe("Return the current app object for x.", "app") is None  # names the definition
    assert describe("Parse Python source bytes and return the root node.", "parse") is None  # the verb names it


def test_followup_reads_from_the_first_answers_grep_hit(made) -> None:
    for ex in (e for e in made if e.kind == "followup_read"):
        roles = [m["role"] for m in ex.messages]
        assert roles == ["system", "user", "assistant", "tool", "assistant", "user", "assistant", "tool", "assistant"]
        (g, gargs, gres), (r, rargs, rres) = _calls(ex)
        assert (g, r) == ("grep", "read_file") and gres.startswith(f"{rargs['path']}:{rargs['start_line']}:")
        assert f"`{rargs['path']}` at line {rargs['start_line']}" in ex.messages[4]["content"]
        assert "`" not in ex.messages[5]["content"]  # the follow-up names nothing: "it"
        first = int(rres.split(":")[0])  # the definition's first line: a decorator above the hit
        assert first <= rargs["start_line"] and f"```\n{first}: " in ex.messages[-1]["content"]


def test_a_refined_search_follows_a_miss_on_a_mistyped_name(made) -> None:
    from codeadapt.trajectories import refine_pattern

    for ex in (e for e in made if e.kind == "grep_refine"):
        (_, first, miss), (_, second, hits) = _calls(ex)
        assert miss == "No matches."
        typo = re.search(r"\) (\w+)\\b$", first["pattern"])[1]
        assert typo in ex.messages[1]["content"]  # the name as the user typed it
        prefix = re.search(r"\) (\w+)\\w\*$", second["pattern"])[1]
        assert typo.startswith(prefix) and second["pattern"] == refine_pattern(prefix)
        answer = ex.messages[-1]["content"]
        meant = {n for n in re.findall(r"`(\w+)`", answer) if n != typo and sorted(n) == sorted(typo)}
        assert len(meant) == 1, answer
        name = meant.pop()
        assert name.startswith(prefix) and f"{ex.path}:" in hits
        first, *rest = answer.split("\n")
        if rest:  # several definitions share the prefix: one bullet each, the meant name among them
            assert first.endswith(f"Definitions starting with `{prefix}`:"), answer
            assert any(ln.startswith(f"- `{name}`: `") for ln in rest), answer
        else:  # one: named in the only sentence
            assert f"`{name}`" in first, answer


def test_list_answers_give_the_count_after_the_items(made) -> None:
    """Every item the grep found, one per bullet, before the count: a count written first
    has to be right before any item is (the trained model wrote the commonest count, 2,
    above most lists); the count then equals the bullets above it."""
    lists = [ex for ex in made if ex.kind in SET_KINDS or (
        ex.kind in ("grep_class", "grep_function") and "\n- " in ex.messages[-1]["content"])]
    assert {ex.kind for ex in lists} >= {"grep_decorator", "grep_importers"}
    for ex in lists:
        answer = ex.messages[-1]["content"]
        head, *rest = answer.split("\n")
        assert not re.search(r"\d", re.sub(r"`[^`]*`", "", head)), head  # no count up front
        bullets = [ln for ln in rest if ln.startswith("- ")]
        hits = [ln for ln in ex.messages[-2]["content"].splitlines() if ln]
        assert bullets and len(bullets) <= len(hits)
        total = re.fullmatch(r"(\d+) [a-z ]+ in all\.", rest[-1])
        assert total and int(total[1]) == len(bullets), answer


def _sets(tmp_path: Path, files: dict[str, str]) -> tuple[dict[str, list], dict[str, int]]:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    ext = extract_checkout(tmp_path, "proj", "0" * 40)
    out, stats = examples.python_examples(tmp_path, ext, {"grep": 60})
    by: dict[str, list] = {}
    for ex in out:
        by.setdefault(ex.kind, []).append(ex)
    return by, stats


SETS = {
    "proj/base.py": "import json\nfrom typing import Generic\n\n\nclass Base:\n    pass\n\n\n"
                    "class A(Base):\n    pass\n\n\nclass B(Base):\n    pass\n\n\n"
                    "def deco(f):\n    return f\n\n\n@deco\ndef one():\n    return json\n\n\n"
                    "@deco\ndef two():\n    pass\n",
    "proj/other.py": "import json\n\n\ndef f():\n    return json.dumps(1)\n",
}


def test_set_answers_list_exactly_what_the_parse_finds(tmp_path) -> None:
    """"Which classes subclass `Base`" lists A and B; "which files import `json`" both files."""
    by, _ = _sets(tmp_path, SETS)
    subs = [ex for ex in by["grep_subclasses"] if "`Base`" in ex.messages[1]["content"]]
    assert len(subs) == 1 and re.findall(r"^- `(\w+)`", subs[0].messages[-1]["content"], re.M) == ["A", "B"]
    imps = [ex for ex in by["grep_importers"] if "`json`" in ex.messages[1]["content"]]
    assert len(imps) == 1 and "`proj/other.py`" in imps[0].messages[-1]["content"]
    assert by["grep_decorator"]


def test_no_set_answer_where_the_grep_finds_lines_the_parse_does_not(tmp_path) -> None:
    """A docstring's `class Doc(Base):`, `from json import x` or `@deco`, or `class C(H[Base])`,
    matches the search but is not a subclass, an import or a use: an answer listing every hit
    would state something false, so the question is not asked (and counted)."""
    doc = ('"""Example::\n\n    class Doc(Base):\n        pass\n\n    from json import loads\n\n'
           '    @deco\n    def g(): pass\n"""\n')
    files = dict(SETS)
    files["proj/more.py"] = doc + "from proj.base import Base\n"
    by, stats = _sets(tmp_path, files)
    assert not [ex for ex in by.get("grep_subclasses", []) if "`Base`" in ex.messages[1]["content"]]
    assert not [ex for ex in by.get("grep_importers", []) if "`json`" in ex.messages[1]["content"]]
    assert not by.get("grep_decorator")
    assert stats["dropped_grep_finds_more_than_parse"] >= 3
    generic = dict(SETS)
    generic["proj/gen.py"] = "from proj.base import Base\n\n\nclass C(Generic[Base]):\n    pass\n"
    by, _ = _sets(tmp_path / "g", generic)
    assert not [ex for ex in by.get("grep_subclasses", []) if "`Base`" in ex.messages[1]["content"]]
