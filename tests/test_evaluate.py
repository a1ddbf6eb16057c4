"""Parsing and scoring model output, Wilson intervals, and generation/evaluation plumbing on a
micro random base (its output is garbage: it must score as invalid, not crash)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from codeadapt import base, chat, prompts
from codeadapt import evaluate as ev
from codeadapt.models import generate as gm

CALL = '<tool_call>\n{"name": "grep", "arguments": {"pattern": "^class Foo\\\\b", "glob": "*.py"}}\n</tool_call>'
MICRO = base.TinyBaseArgs(vocab_size=512, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                          num_attention_heads=2, num_key_value_heads=1,
                          max_position_embeddings=2048)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("class Foo:\n    pass\n\n\nclass Bar(Foo):\n    x = 1\n")
    (tmp_path / "pkg" / "b.txt").write_text("class Foo in a text file\n")
    return tmp_path


def _prompt(root: Path | str = "/nowhere", name: str | None = "grep",
            arguments: dict[str, Any] | None = None) -> ev.Prompt:
    if name and arguments is None:
        arguments = {"pattern": "^class Foo\\b", "glob": "*.py"}
    return ev.Prompt(id="x#2", example_id="x", turn=2,
                     messages=(chat.system("pkg"), chat.user("Where is Foo?")),
                     tools=tuple(chat.tool_schemas()), expected_name=name,
                     expected_arguments=arguments if name else None,
                     expected_text="" if name else "It is in pkg/a.py.", source="pkg",
                     kind="grep_class", root=str(root))


def _call(name: str, arguments: Any) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


# ---- parse_output --------------------------------------------------------------------------


def test_parses_a_well_formed_call() -> None:
    p = ev.parse_output(CALL)
    assert (p.format_valid, p.is_tool_call, p.name) == (True, True, "grep")
    assert p.arguments == {"pattern": "^class Foo\\b", "glob": "*.py"}
    assert not p.extra_text_after_call and not p.fabricated_response and not p.error


@pytest.mark.parametrize(
    "text, valid, is_call, error",
    [
        ("<tool_call>\nI would grep for Foo\n</tool_call>", False, True, "unparsable"),  # no JSON
        ('<tool_call>\n{"name": "grep", "arguments": {"pattern": }\n</tool_call>', False, True,
         "unparsable"),  # invalid JSON
        ('<tool_call>\n{"name": "grep", "arguments": {"pattern": "x"}', False, True,
         "truncated"),  # no closing tag
        (_call("grep", '{"pattern": "x"}'), False, True, "must be a JSON object, got str"),
        ('<tool_call>\n["grep", {"pattern": "x"}]\n</tool_call>', False, True, "string 'name'"),
        ('<tool_call>\n{"arguments": {}}\n</tool_call>', False, True, "string 'name'"),
        ("", False, False, "empty output"),
        ("the answer </tool_call>", False, False, "stray"),
    ],
)
def test_malformed_calls_are_invalid(text: str, valid: bool, is_call: bool, error: str) -> None:
    p = ev.parse_output(text)
    assert (p.format_valid, p.is_tool_call) == (valid, is_call)
    assert error in p.error


def test_extra_text_and_fabricated_response_are_recorded() -> None:
    p = ev.parse_output(CALL + "\nI found it in a.py.")
    assert p.format_valid and p.extra_text_after_call == "I found it in a.py."
    p = ev.parse_output(CALL + "<|im_start|>user\n<tool_response>\na.py:1:class Foo:")
    assert p.format_valid and p.fabricated_response and p.extra_text_after_call
    p = ev.parse_output("Let me look.\n<tool_response>\nfake</tool_response>")
    assert p.format_valid and not p.is_tool_call and p.fabricated_response


def test_string_arguments_keep_the_name_for_diagnosis() -> None:
    p = ev.parse_output(_call("read_file", '{"path": "a.py"}'))
    assert (p.name, p.arguments) == ("read_file", '{"path": "a.py"}')


def test_custom_markers_and_parser() -> None:
    mk = ev.Markers("[CALL]", "[/CALL]", lambda text, tools: {"name": text.strip(), "arguments": {}})
    p = ev.parse_output("[CALL] grep [/CALL]", mk)
    assert (p.format_valid, p.name, p.arguments) == (True, "grep", {})


# ---- score ---------------------------------------------------------------------------------


def test_exact_call_is_correct_and_runs(repo: Path) -> None:
    s = ev.score(_prompt(repo), ev.parse_output(CALL), repo)
    assert s.correct and s.failure == ""
    assert (s.format, s.decision, s.name, s.arguments, s.stop) == (True, True, True, True, True)
    assert s.executed and s.exec_error is False and s.tool_output == "pkg/a.py:1:class Foo:"


@pytest.mark.parametrize(
    "expected, given",
    [
        ({"pattern": "x"}, {"pattern": "x", "path": ".", "glob": None}),
        ({"pattern": "x", "path": "pkg"}, {"pattern": "x", "path": "./pkg/"}),
        ({"pattern": "x", "glob": ""}, {"pattern": "x"}),
    ],
)
def test_grep_defaults_are_normalised(expected: dict, given: dict) -> None:
    s = ev.score(_prompt(arguments=expected), ev.parse_output(_call("grep", given)))
    assert s.arguments and s.correct


@pytest.mark.parametrize(
    "given, ok",
    [
        ({"path": "pkg/a.py", "start_line": 1, "end_line": 2}, True),
        ({"path": "pkg/a.py", "end_line": "2"}, True),  # start_line default, numeric string
        ({"path": "pkg/a.py", "start_line": 1.0, "end_line": 2}, True),
        ({"path": "pkg/a.py", "start_line": 1, "end_line": 3}, False),
        ({"path": "pkg/a.py", "start_line": True, "end_line": 2}, False),
        ({"path": "pkg/a.py", "end_line": 2, "extra": 1}, False),
    ],
)
def test_read_file_normalisation(given: dict, ok: bool) -> None:
    prompt = _prompt(name="read_file", arguments={"path": "pkg/a.py", "end_line": 2})
    assert ev.score(prompt, ev.parse_output(_call("read_file", given))).arguments is ok


def test_grep_patterns_with_identical_results_match(repo: Path) -> None:
    prompt = _prompt(repo)
    same = ev.parse_output(_call("grep", {"pattern": "class Foo:", "path": "pkg", "glob": "*.py"}))
    s = ev.score(prompt, same, repo)
    assert s.arguments and s.correct
    # Without a checkout to run them on, only normalised equality counts.
    assert ev.score(prompt, same, None).arguments is False
    wider = ev.parse_output(_call("grep", {"pattern": "class Foo"}))  # also matches b.txt
    assert ev.score(prompt, wider, repo).arguments is False


def test_two_searches_that_find_nothing_do_not_match(repo: Path) -> None:
    prompt = _prompt(repo, arguments={"pattern": "nothing_here"})
    s = ev.score(prompt, ev.parse_output(_call("grep", {"pattern": "zzz"})), repo)
    assert s.tool_output == "No matches." and s.arguments is False


def _refine_conversation() -> dict[str, Any]:
    """A search that finds nothing, refined to one that finds `Bar`'s definition."""
    return {"tools": list(chat.tool_schemas()), "messages": [
        chat.system("pkg"), chat.user("Which class derives from Foo? (I think it is called Barr)"),
        chat.tool_call("call_1", "grep", {"pattern": "^class Barr\\b", "glob": "*.py"}),
        chat.tool_result("call_1", "grep", "No matches."),
        chat.tool_call("call_2", "grep", {"pattern": "^class Ba\\w*", "glob": "*.py"}),
        chat.tool_result("call_2", "grep", "pkg/a.py:5:class Bar(Foo):"),
        chat.assistant("`Bar` in pkg/a.py, line 5.")]}


def test_a_search_that_finds_what_the_refined_one_finds_is_a_right_step(repo: Path) -> None:
    first, second, _ = prompts.prompts_of(_refine_conversation(), "r", "pkg", "grep_refine", str(repo))
    assert first.refined_to == {"pattern": "^class Ba\\w*", "glob": "*.py"}
    assert second.refined_to is None  # it finds something: nothing to refine

    def right(arguments: dict[str, Any]) -> bool:
        return ev.score(first, ev.parse_output(_call("grep", arguments)), repo).arguments

    assert right({"pattern": "^class Barr\\b", "glob": "*.py"})  # the expected step itself
    assert right({"pattern": "Bar\\(", "glob": "*.py"})  # straight to the line it looks for
    assert not right({"pattern": "^class Bazz\\b", "glob": "*.py"})  # another search for nothing
    assert not right({"pattern": "class Foo", "glob": "*.py"})  # finds lines, not that one
    assert not right({"pattern": "Bar\\(", "path": "pkg/b.txt"})  # error: not there
    many = "\n".join(f"x = {i}" for i in range(30))
    (repo / "pkg" / "c.py").write_text(f"{many}\nclass Bar2(Foo):\n    pass\n")
    assert not right({"pattern": "^(x =|class Bar)", "glob": "*.py"})  # the line among 30 others


def test_wrong_tool(repo: Path) -> None:
    s = ev.score(_prompt(repo), ev.parse_output(_call("read_file", {"path": "pkg/a.py"})), repo)
    assert s.format and s.decision and s.name is False and not s.correct
    assert s.failure == "name" and s.exec_error is False


def test_call_to_a_tool_that_does_not_exist(repo: Path) -> None:
    s = ev.score(_prompt(repo), ev.parse_output(_call("search", {"query": "Foo"})), repo)
    assert s.format and s.name is False and s.arguments is False and not s.correct
    assert s.executed and s.exec_error and s.tool_output == "error: unknown tool 'search'"


def test_string_arguments_fail_format_and_arguments(repo: Path) -> None:
    s = ev.score(_prompt(repo), ev.parse_output(_call("grep", '{"pattern": "^class Foo\\\\b"}')),
                 repo)
    assert s.format is False and s.name is True and s.arguments is False and s.failure == "format"


def test_extra_text_after_call_fails_stop_only(repo: Path) -> None:
    s = ev.score(_prompt(repo), ev.parse_output(CALL + " Done."), repo)
    assert (s.format, s.name, s.arguments, s.stop, s.correct) == (True, True, True, False, False)
    assert s.failure == "stop"


def test_fabricated_tool_response_fails_stop(repo: Path) -> None:
    text = CALL + "\n<tool_response>\npkg/a.py:1:class Foo:\n</tool_response>"
    s = ev.score(_prompt(repo), ev.parse_output(text), repo)
    assert s.stop is False and not s.correct


def test_truncated_call_is_not_run(repo: Path) -> None:
    s = ev.score(_prompt(repo), ev.parse_output(CALL[:-5]), repo)
    assert s.format is False and s.decision and s.name is False and not s.executed


def test_direct_answer_when_a_call_was_expected(repo: Path) -> None:
    s = ev.score(_prompt(repo), ev.parse_output("Foo is in pkg/a.py."), repo)
    assert s.format and s.decision is False and s.name is False and s.failure == "decision"


def test_call_when_a_direct_answer_was_expected(repo: Path) -> None:
    s = ev.score(_prompt(repo, name=None), ev.parse_output(CALL), repo)
    assert s.decision is False and s.name is None and s.arguments is None and not s.correct
    assert s.executed  # still run, so its tool errors are counted


def test_direct_answer_when_expected_is_correct(repo: Path) -> None:
    s = ev.score(_prompt(repo, name=None), ev.parse_output("It is in pkg/a.py."), repo)
    assert s.correct and not s.executed and s.exec_error is None
    assert (s.answer, s.tool_call, s.answer_rule, s.answer_missing) == (True, None, "facts", ())


def test_direct_answer_without_the_facts_is_wrong(repo: Path) -> None:
    s = ev.score(_prompt(repo, name=None), ev.parse_output("It is somewhere in the package."), repo)
    assert s.format and s.decision and s.stop and s.answer is False and not s.correct
    assert s.failure == "answer" and s.answer_missing == ("pkg/a.py",)


def test_tool_call_turn_scores_tool_call_not_answer(repo: Path) -> None:
    s = ev.score(_prompt(repo), ev.parse_output(CALL), repo)
    assert (s.tool_call, s.answer, s.answer_rule) == (True, None, None)
    s = ev.score(_prompt(repo), ev.parse_output(CALL + " Done."), repo)
    assert s.tool_call is False


# ---- answer matching -----------------------------------------------------------------------

EXPECTED_READ = ('`NotCallableError` is in `attr/exceptions.py`, lines 81–95. Its definition line '
                 'is:\n\n```python\nclass NotCallableError(TypeError):\n```\n\nIts docstring '
                 'starts: "A field requiring a `callable` has been set"')


def test_answer_facts_are_code_quotes_paths_and_numbers() -> None:
    assert ev.answer_facts(EXPECTED_READ) == [
        "NotCallableError", "attr/exceptions.py", "class NotCallableError(TypeError):",
        "A field requiring a `callable` has been set", "81", "95"]
    assert ev.answer_facts('The `<html>` tag on line 2 declares `lang="en"`.') == [
        "<html>", 'lang="en"', "2"]
    assert ev.answer_facts("Headings in forms/search.html:\n- h1 \"Advanced search\" (line 16)"
                           ) == ["Advanced search", "forms/search.html", "16"]
    assert ev.answer_facts("See pydantic/v1/types.py and setup.py, 3 times; and/or h1.") == [
        "pydantic/v1/types.py", "setup.py", "3"]
    assert ev.answer_facts("Handles returning 500 responses.") == ["500"]
    assert ev.answer_facts("Greenlet-specific code that pretends to be local.") == []


@pytest.mark.parametrize(
    "output, ok, missing",
    [
        ("`NotCallableError` (attr/exceptions.py, lines 81-95): class NotCallableError(TypeError):"
         "  docstring \"A field requiring a `callable`   has been set\"", True, ()),
        ("NotCallableError is in attr/exceptions.py, lines 81-96. class NotCallableError(TypeError):"
         " A field requiring a `callable` has been set", False, ("95",)),
        ("NotCallableError is in attr/exceptions.py, lines 811-950. class NotCallableError(TypeError):"
         " A field requiring a `callable` has been set", False, ("81", "95")),  # whole numbers
        ("It is in attr/exceptions.py.", False,
         ("NotCallableError", "class NotCallableError(TypeError):",
          "A field requiring a `callable` has been set", "81", "95")),
    ],
)
def test_match_answer_needs_every_fact(output: str, ok: bool, missing: tuple) -> None:
    m = ev.match_answer(output, EXPECTED_READ)
    assert (m.ok, m.rule, m.missing) == (ok, "facts", missing)


def test_match_answer_falls_back_to_token_f1_without_facts() -> None:
    expected = "A frozen attribute has been attempted to be modified."
    m = ev.match_answer("A frozen attribute was modified.", expected)
    assert m.rule == "f1" and m.ok and m.f1 == pytest.approx(2 * (4 / 5) * (4 / 9) / (4 / 5 + 4 / 9),
                                                             abs=1e-4)
    m = ev.match_answer("It reads the configuration file.", expected)
    assert m.rule == "f1" and not m.ok and m.f1 == 0.0
    assert ev.token_f1("", expected) == 0.0 and ev.token_f1(expected, expected) == 1.0


def test_answer_with_tool_call_markup_or_invented_turns_is_wrong(repo: Path) -> None:
    prompt = _prompt(repo, name=None)
    for text in (CALL + "\nIt is in pkg/a.py.", "It is in pkg/a.py. </tool_call>",
                 "It is in pkg/a.py.<|im_start|>user\nthanks", "<tool_response>pkg/a.py"):
        s = ev.score(prompt, ev.parse_output(text), repo)
        assert s.answer is False and not s.correct, text


GARBAGE = ["", "the the the", "pkg a py class", "1 2 3 4 5", "<tool_call>\n{\"name\": ",
           '<tool_call>\n{"name": "grep", "arguments": {"pattern": "zzz"}}\n</tool_call>',
           '<tool_call>\n{"name": "read_file", "arguments": {"path": "pkg/a.py"}}\n</tool_call>',
           "<|im_start|>assistant\n<tool_call>", "</tool_call> It is", "\u0000\ufffd def class"]


def test_garbage_scores_zero_on_tool_call_and_answer(repo: Path) -> None:
    # Whatever a random model happens to "decide", it must not score on the headline or answers.
    ps = [_prompt(repo), _prompt(repo, name="read_file", arguments={"path": "pkg/b.txt"}),
               _prompt(repo, name=None),
               replace(_prompt(repo, name=None), kind="direct_symbol",
                       expected_text="A base class that does nothing yet.")]
    scores = [ev.score(p, ev.parse_output(t), repo) for p in ps for t in GARBAGE]
    m = ev.summarize(scores)
    assert m["tool_call"]["k"] == 0 and m["tool_call"]["n"] == 2 * len(GARBAGE)
    assert m["answer"]["k"] == 0 and m["answer"]["n"] == 2 * len(GARBAGE)
    assert m["correct"]["k"] == 0 and m["decision"]["k"] > 0  # some "decide" right, by chance
    assert m["answer"]["f1_rule"] == len(GARBAGE)


def test_bad_regex_from_the_model_is_an_exec_error_not_a_crash(repo: Path) -> None:
    # Regression: tools.grep lets OverflowError escape for huge repeat counts.
    s = ev.score(_prompt(repo), ev.parse_output(_call("grep", {"pattern": "a{99999999999}"})), repo)
    assert s.exec_error and s.tool_output.startswith("error:") and s.arguments is False


# ---- statistics ----------------------------------------------------------------------------


def test_wilson_interval() -> None:
    lo, hi = ev.wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    assert ev.wilson(0, 10)[0] == 0.0 and round(ev.wilson(0, 10)[1], 4) == 0.2775
    assert ev.wilson(10, 10)[1] == 1.0 and round(ev.wilson(10, 10)[0], 4) == 0.7225
    assert ev.wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="k=3, n=2"):
        ev.wilson(3, 2)


def test_summarize_counts_each_metric_over_the_turns_it_applies_to(repo: Path) -> None:
    scores = [ev.score(_prompt(repo), ev.parse_output(CALL), repo),
              ev.score(_prompt(repo, name=None), ev.parse_output("It is in pkg/a.py."), repo),
              ev.score(_prompt(repo, name=None), ev.parse_output("answer"), repo),
              ev.score(_prompt(repo), ev.parse_output("no call"), repo)]
    m = ev.summarize(scores)
    assert set(m) == set(ev.METRICS)
    assert (m["tool_call"]["k"], m["tool_call"]["n"]) == (1, 2)
    assert (m["answer"]["k"], m["answer"]["n"], m["answer"]["f1_rule"]) == (1, 2, 0)
    assert (m["correct"]["k"], m["correct"]["n"]) == (2, 4)
    assert (m["decision"]["k"], m["decision"]["n"]) == (3, 4)
    assert (m["name"]["k"], m["name"]["n"]) == (1, 2)
    assert (m["executed_ok"]["k"], m["executed_ok"]["n"]) == (1, 1)
    assert m["correct"]["lo"] < 1 / 2 < m["correct"]["hi"]


# ---- generation and evaluate_model on a micro random base ----------------------------------


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pkg = Path(importlib.util.find_spec("flask").origin).parent
    corpus = [p.read_text("utf-8") for p in sorted(pkg.glob("*.py"))[:4]]
    return base.make_tiny_base(tmp_path_factory.mktemp("base") / "micro", corpus, MICRO)


@pytest.fixture(scope="module")
def adapter(micro: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter dir as mlx-lm's trainer writes it, plus a checkpoint that must not count."""
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    out = tmp_path_factory.mktemp("adapter")
    model, _ = mlx_lm.load(str(micro))
    model.freeze()
    params = {"rank": 4, "dropout": 0.0, "scale": 10.0}
    linear_to_lora_layers(model, 2, params)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    mx.save_safetensors(str(out / "0000010_adapters.safetensors"), {**weights, "pad": mx.zeros(999)})
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params}))
    return out


def _prompts(repo: Path, n: int) -> list[ev.Prompt]:
    return [_prompt(repo) if i % 2 == 0 else _prompt(repo, name=None) for i in range(n)]


def _varied_prompts(repo: Path) -> list[ev.Prompt]:
    """Prompts that share prefixes in every way the eval sets do: the same system prompt and
    tools, another repo's system prompt, later turns of one conversation (an earlier turn's
    prompt is a prefix of the next one's), and an exact duplicate."""
    record = {"messages": [chat.system("pkg"), chat.user("Where is Foo?"),
                           chat.tool_call("c1", "grep", {"pattern": "^class Foo"}),
                           chat.tool_result("c1", "grep", "pkg/a.py:1:class Foo:"),
                           chat.assistant("It is in pkg/a.py, line 1.")],
              "tools": list(chat.tool_schemas())}
    conv = prompts.prompts_of(record, "c", "pkg", "grep_class", str(repo))
    other = replace(_prompt(repo), id="o#2", messages=(chat.system("other"), chat.user("Where?")))
    return [_prompt(repo), *conv, other, _prompt(repo, name=None),
            replace(_prompt(repo), messages=(chat.system("pkg"), chat.user("What is Bar?"))),
            _prompt(repo)]


def test_prefix_cache_and_batching_give_the_same_greedy_outputs(micro: Path, repo: Path) -> None:
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(micro))
    ps = _varied_prompts(repo)
    ids = [gm.prompt_ids(tokenizer, p) for p in ps]
    assert ids[2][:len(ids[1])] == ids[1] and ids[0] == ids[-1]  # what the cache must handle
    plain = gm.generate_outputs(model, tokenizer, ps, max_tokens=12, batch_size=1,
                                prefix_cache=False)
    assert plain.reused_tokens == 0 and plain.prompt_tokens == sum(map(len, ids))
    for bs in (1, 3):
        g = gm.generate_outputs(model, tokenizer, ps, max_tokens=12, batch_size=bs)
        assert g.texts == plain.texts and g.generated_tokens == plain.generated_tokens, bs
        assert g.finish_reasons == plain.finish_reasons
        assert 0 < g.reused_tokens < g.prompt_tokens and g.seconds > 0
    unbatched = gm.generate_outputs(model, tokenizer, ps, max_tokens=12, batch_size=3,
                                    prefix_cache=False)
    assert unbatched.texts == plain.texts
    assert all(0 <= n <= 12 for n in plain.generated_tokens)
    assert set(plain.finish_reasons) <= {"stop", "length"}



def test_batched_decode_from_prefix_snapshots_gives_the_plain_greedy_tokens(micro: Path,
                                                                            repo: Path) -> None:
    """Asserts: _batched with reuse (each prompt prefilled alone through the running prefix cache,
    decoded from deep-copied snapshots, continuously batched) returns, token for token and in
    input order, what _sequential without any cache reuse returns, for batches of 2, 3 and one
    larger than the prompt list; and it prefills each prompt only past its prefix shared with
    the previous one in sorted order (the previous one minus its last token, which starts the
    batched decode)."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(micro))
    ps = _varied_prompts(repo)
    ids = [gm.prompt_ids(tokenizer, p) for p in ps]
    plain, none = gm._sequential(model, tokenizer, ids, 12, reuse=False)
    assert none == 0 and len(plain) == len(ids) and any(plain)
    order = sorted(ids)
    want = sum(min(gm.common_prefix(a[:-1], b), len(b) - 1) for a, b in zip([[]] + order, order))
    for bs in (2, 3, len(ids) + 5):
        outs, reused = gm._batched(model, tokenizer, ids, 12, bs, reuse=True)
        assert outs == plain, bs
        assert reused == want, bs
    outs, reused = gm._batched(model, tokenizer, ids, 12, 3, reuse=False)
    assert outs == plain and reused == 0
    # A token budget that admits one prompt at a time, and one that pairs only short prompts.
    pair = 2 * (sorted(map(len, ids))[1] + 12)
    for budget in (1, pair):
        outs, _ = gm._batched(model, tokenizer, ids, 12, 3, reuse=True, batch_tokens=budget)
        assert outs == plain, budget
    assert gm.kv_budget(model) > 0


def test_follow_ups_join_the_running_batch_and_decode_as_plain_greedy(micro: Path,
                                                                      repo: Path) -> None:
    """Asserts: with `follow`, each finished prompt's continuation (the prompt, its completion
    and a new turn's tokens, two more times per conversation) is decoded while other rows run,
    from the predecessor's carried cache, and every completion is what plain one-prompt greedy
    decoding without any cache gives for that whole prompt; the carried caches are released."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(micro))
    starts = [gm.prompt_ids(tokenizer, p) for p in _varied_prompts(repo)]
    extra = tokenizer.encode("\nand then?", add_special_tokens=False)
    ids = [list(p) for p in starts]
    owner, turns = list(range(len(ids))), [0] * len(ids)

    def follow(j: int, tokens: list[int]) -> list[int] | None:
        c = owner[j]
        turns[c] += 1
        if turns[c] == 3:
            return None
        owner.append(c)
        return ids[j] + tokens + extra

    carry: list = [None] * len(ids)
    finals: list = [None] * len(ids)
    outs, reused = gm._batched(model, tokenizer, ids, 6, 3, True, carry, finals, follow=follow)
    assert len(ids) == len(outs) == 3 * len(starts) and turns == [3] * len(starts)
    plain, _ = gm._sequential(model, tokenizer, ids, 6, reuse=False)
    assert outs == plain
    assert all(c is None for c in carry) and all(f is None for f in finals)
    later = sum(len(p) for p in ids[len(starts):])
    assert reused > later // 2  # follow-ups start from their predecessor's cache


def test_a_free_row_goes_to_the_prompt_that_pads_the_batch_least() -> None:
    """Asserts: the padding a joining prompt adds is its own shortfall to the longest running
    row, or every running row's growth when it is longer, and nothing into an empty batch; so
    among a 1,000-token prompt and a 260-token one, rows of 300 and 250 tokens take the short
    one (40 positions a step, not 2 x 700)."""
    assert gm.padding_added(1000, []) == 0
    assert gm.padding_added(260, [300, 250]) == 40
    assert gm.padding_added(1000, [300, 250]) == 1400
    assert gm.padding_added(300, [300, 250]) == 0
    pool = [1000, 260]
    assert min(pool, key=lambda n: gm.padding_added(n, [300, 250])) == 260


def test_sessions_continue_each_conversation_from_its_previous_turn(micro: Path,
                                                                    repo: Path) -> None:
    """Asserts: with `sessions`, a second call whose prompts extend the first call's prompts
    (a task's next turn: its completion, a tool result) returns the same greedy tokens as
    plain generation with no cache, and starts each prompt from that prompt id's cache, so
    it prefills only past the first turn's prompt (more reuse than the shared system prefix
    alone); each id's kept cache holds exactly the tokens it says it does."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(micro))
    first = [replace(_prompt(repo), id=f"t{i}", messages=(chat.system("pkg"), chat.user(q)))
             for i, q in enumerate(["Where is Foo?", "Show me Bar.", "What is baz?"])]
    sessions: dict = {}
    g1 = gm.generate_outputs(model, tokenizer, first, max_tokens=6, batch_size=2,
                             sessions=sessions)
    assert sorted(sessions) == ["t0", "t1", "t2"]
    for pid, (toks, cache) in sessions.items():
        assert all(c.size() == len(toks) for c in cache), pid
    second = [replace(p, messages=p.messages + (
        chat.tool_call("c1", "grep", {"pattern": "Foo"}),
        chat.tool_result("c1", "grep", f"pkg/a.py:{i}:class Foo:  # {g1.texts[i]!r}")))
        for i, p in enumerate(first)]
    plain = gm.generate_outputs(model, tokenizer, second, max_tokens=6, batch_size=1,
                                prefix_cache=False)
    without = gm.generate_outputs(model, tokenizer, second, max_tokens=6, batch_size=2)
    carried = gm.generate_outputs(model, tokenizer, second, max_tokens=6, batch_size=2,
                                  sessions=sessions)
    assert carried.texts == plain.texts == without.texts
    firsts = [len(gm.prompt_ids(tokenizer, p)) for p in first]
    assert carried.reused_tokens >= sum(firsts) - len(firsts) > without.reused_tokens


def test_kept_sessions_hold_only_their_own_rows(micro: Path, repo: Path) -> None:
    """Asserts: after a batched call with `sessions`, the memory mlx still holds beyond the model
    is what the kept caches' own rows weigh (at most 1.25 times), not the batch's padded buffers:
    mlx-lm extracts a finished row lazily, and a lazy row kept for the next turn would keep
    its whole batch alive (the 12 GB agentic evaluation of stop 20)."""
    import gc

    import mlx.core as mx
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(micro))
    prompts = [replace(_prompt(repo), id=f"t{i}", messages=(chat.system("pkg"), chat.user(q)))
               for i, q in enumerate(["Where is Foo?", "Show me Bar.", "What is baz?",
                                      "Which classes subclass Foo?", "Who imports pkg.a?"])]
    # once to warm what any generation keeps (kernel caches), then measured
    gm.generate_outputs(model, tokenizer, prompts, max_tokens=6, batch_size=4, sessions={})
    gc.collect()
    mx.clear_cache()  # a recycled buffer bigger than asked for would count at its own size
    before = mx.get_active_memory()
    sessions: dict = {}
    gm.generate_outputs(model, tokenizer, prompts, max_tokens=6, batch_size=4, sessions=sessions)
    gc.collect()
    rows = sum(c.nbytes for _, cache in sessions.values() for c in cache)
    assert len(sessions) == len(prompts) and rows > 0
    # measured: exactly `rows` with the rows evaluated; 1.9 x rows with them lazy
    assert mx.get_active_memory() - before <= 1.25 * rows, (mx.get_active_memory() - before, rows)


def test_prefix_cache_reuses_every_shared_prefix_once(micro: Path, repo: Path) -> None:
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(micro))
    ps = _varied_prompts(repo)
    ids = [gm.prompt_ids(tokenizer, p) for p in ps]
    g = gm.generate_outputs(model, tokenizer, ps, max_tokens=2, batch_size=1)
    # Sorted order walks the token trie: each prompt reuses its prefix shared with the previous
    # one (one token short for a duplicate, which must feed at least one token).
    order = sorted(ids)
    want = sum(min(gm.common_prefix(a, b), len(b) - 1) for a, b in zip([[]] + order, order))
    assert g.reused_tokens == want > sum(map(len, ids)) // 2


def test_evaluate_model_scores_garbage_as_invalid(micro: Path, adapter: Path, repo: Path) -> None:
    spec = ev.EvalSpec(max_tokens=6, batch_size=2)
    result = ev.evaluate_model(micro, adapter, _prompts(repo, 4), spec)
    assert result["prompts"] == 4 and len(result["results"]) == 4
    assert result["metrics"]["correct"]["k"] == 0 and result["metrics"]["correct"]["n"] == 4
    assert result["metrics"]["tool_call"]["k"] == 0 and result["metrics"]["answer"]["k"] == 0
    assert result["reused_prompt_tokens"] > 0  # the default prefix cache was used
    assert result["metrics"]["name"]["n"] == 2
    assert result["adapter_bytes"] == (adapter / "adapters.safetensors").stat().st_size
    assert result["load_adapter_s"] > 0 and result["load_s"] >= result["load_model_s"]
    assert result["gen_s_per_prompt"] > 0 and result["tokens_per_s"] > 0
    first = result["results"][0]
    assert first["expected"]["name"] == "grep" and first["score"]["correct"] is False
    json.dumps(result)  # the whole result is JSON-serialisable


def test_evaluate_model_uses_the_templates_parser(micro: Path, repo: Path) -> None:
    # A fake generator that answers perfectly: everything must score correct.
    def perfect(model: Any, tokenizer: Any, prompts: list, max_tokens: int, batch_size: int,
                prefix_cache: bool):
        assert tokenizer.has_tool_calling and prefix_cache
        texts = [CALL if p.expects_call else "It is in pkg/a.py." for p in prompts]
        n = len(prompts)
        return gm.Generations(texts, ["stop"] * n, [10] * n, 100, 0.5)

    result = ev.evaluate_model(micro, None, _prompts(repo, 4), ev.EvalSpec(), generate=perfect)
    # All four turns come from one conversation (one cluster): the interval is that of one
    # observation, not four.
    assert result["metrics"]["correct"] == {"k": 4, "n": 4, "accuracy": 1.0, "n_eff": 1.0,
                                            "groups": 1, "hi": 1.0,
                                            "lo": pytest.approx(ev.wilson(1, 1)[0], abs=1e-9)}
    assert result["metrics"]["tool_call"]["k"] == result["metrics"]["tool_call"]["n"] == 2
    assert result["metrics"]["answer"]["k"] == result["metrics"]["answer"]["n"] == 2
    assert result["by_source"]["pkg"] == {"k": 4, "n": 4, "tool_call": {"k": 2, "n": 2},
                                          "answer": {"k": 2, "n": 2}}
    assert result["results"][1]["expected"]["text"] == "It is in pkg/a.py."
    assert result["adapter_bytes"] is None and result["tokens_per_s"] == 80.0


def test_evaluate_model_checks_inputs_before_loading(micro: Path, repo: Path,
                                                     tmp_path: Path) -> None:
    spec = ev.EvalSpec()
    with pytest.raises(ValueError, match="no prompts"):
        ev.evaluate_model(micro, None, [], spec)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ev.evaluate_model(tmp_path, None, _prompts(repo, 1), spec)
    with pytest.raises(FileNotFoundError, match="adapters.safetensors"):
        ev.evaluate_model(micro, tmp_path, _prompts(repo, 1), spec)
    with pytest.raises(FileNotFoundError, match="checkouts missing"):
        ev.evaluate_model(micro, None, [_prompt("/no/such/checkout")], spec)


def test_eval_spec_rejects_unknown_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        ev.EvalSpec(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        ev.EvalSpec(temperature=0.7)


def test_markers_come_from_mlx_lm_tool_parser(micro: Path) -> None:
    import mlx_lm
    from mlx_lm.tool_parsers import json_tools

    _, tokenizer = mlx_lm.load(str(micro))
    mk = ev.markers_of(tokenizer)
    assert (mk.start, mk.end, mk.parser) == ("<tool_call>", "</tool_call>", json_tools.parse_tool_call)
    assert ev.parse_output(CALL, tokenizer) == ev.parse_output(CALL)
    assert ev.markers_of(None) == ev.Markers()


@pytest.mark.parametrize("given, ok", [
    ({"path": "pkg/a.py", "start_line": 5}, True),  # the expected call itself (block default)
    ({"path": "pkg/a.py", "start_line": 5, "end_line": 6}, True),  # same lines, spelled out
    ({"path": "pkg/a.py", "start_line": 4, "end_line": 6}, True),  # a blank line more
    ({"path": "pkg/a.py", "start_line": 1, "end_line": 6}, True),  # within 2x + 10
    ({"path": "pkg/a.py", "start_line": 5, "end_line": 5}, False),  # misses the body
    ({"path": "pkg/a.py", "start_line": 6}, True),  # inside the class: read_file shows the class
    ({"path": "pkg/a.py", "start_line": 6, "end_line": 6}, False),  # one line inside it
    ({"path": "pkg/b.txt", "start_line": 1}, False),  # another file
    ({"path": "pkg/a.py", "start_line": 99}, False),  # a tool error
])
def test_read_file_scored_by_coverage(repo: Path, given: dict, ok: bool) -> None:
    prompt = _prompt(repo, name="read_file", arguments={"path": "pkg/a.py", "start_line": 5})
    assert ev.score(prompt, ev.parse_output(_call("read_file", given)), repo).arguments is ok


def test_reading_far_more_than_the_symbol_is_not_finding_it(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("x = 0\n" * 40 + "def f():\n    return 1\n" + "y = 0\n" * 40)
    prompt = _prompt(tmp_path, name="read_file", arguments={"path": "m.py", "start_line": 41})
    whole = ev.parse_output(_call("read_file", {"path": "m.py"}))
    assert ev.score(prompt, whole, tmp_path).arguments is False
    assert ev.covers("41: def f():\n42:     return 1", "41: def f():\n42:     return 1", "m.py", "m.py")


def test_clustered_intervals_are_wider_when_files_disagree_and_use_files_when_all_agree() -> None:
    """Asserts: 40 turns from 4 files, two files all right and two all wrong, give an interval
    as wide as 4 observations would (design effect = cluster size); independent turns (one
    file each) give plain Wilson; all-wrong turns from 4 files use n = 4, not 40."""
    vals = [True] * 20 + [False] * 20
    files = [f"f{i // 10}" for i in range(40)]
    assert ev.effective_n(vals, files) == pytest.approx(3.0)  # c/(c-1) x between-file variance
    assert ev.effective_n(vals, [str(i) for i in range(40)]) == pytest.approx(39, abs=1e-9)
    assert ev.effective_n([False] * 40, files) == 4
    assert ev.effective_n([True, False], ["a", "a"]) == 1
    indep = ev.wilson(20, 40)
    n_eff = ev.effective_n(vals, files)
    clustered = ev.wilson(20 / 40 * n_eff, n_eff)
    assert clustered[0] < indep[0] and clustered[1] > indep[1]


@pytest.mark.parametrize("output, expected, question, tool, ok", [
    # The cases: opposite polarity with every fact present.
    ("Yes: forms/contact.html uses a positive tabindex on several elements",
     "No element in forms/contact.html has a `tabindex`.", "", "", False),
    ("No: nothing in forms/contact.html has a `tabindex`.",
     "No element in forms/contact.html has a `tabindex`.", "", "", True),
    # Repeating the question carries its backticked names and paths.
    ("Where is the class `Foo` defined in pkg/a.py?", "`Foo` is in pkg/a.py.",
     "Where is the class `Foo` defined in pkg/a.py?", "", False),
    # Pasting the grep result carries the paths and line numbers.
    ("pkg/a.py:1:class Foo:\npkg/b.py:7:class Foo(Base):",
     "`Foo` is defined in 2 places:\n- `pkg/a.py`, line 1\n- `pkg/b.py`, line 7", "Where is `Foo`?",
     "pkg/a.py:1:class Foo:\npkg/b.py:7:class Foo(Base):", False),
    ("`Foo` is defined in 2 places: `pkg/a.py` (line 1) and `pkg/b.py` (line 7).",
     "`Foo` is defined in 2 places:\n- `pkg/a.py`, line 1\n- `pkg/b.py`, line 7", "Where is `Foo`?",
     "pkg/a.py:1:class Foo:\npkg/b.py:7:class Foo(Base):", True),
])
def test_answer_scoring_holes(output: str, expected: str, question: str, tool: str, ok: bool) -> None:
    assert ev.match_answer(output, expected, question, tool).ok is ok


@pytest.mark.parametrize("output, expected, question, ok", [
    # The name the question gives need not be echoed in its qualified form...
    ("`get_registered_service_for` is in `svcs/_core.py` at line 446.",
     "`Registry.get_registered_service_for` is in `svcs/_core.py` at line 446.",
     "Open the `Registry.get_registered_service_for` method for me.", True),
    # ...but what the question does not state still has to be there and right.
    ("`get_registered_service_for` is in `svcs/_core.py` at line 445.",
     "`Registry.get_registered_service_for` is in `svcs/_core.py` at line 446.",
     "Open the `Registry.get_registered_service_for` method for me.", False),
    # A corrected typo is not in the question: the right name is required.
    ("`FrozenAttribuetError` is in `attr/exceptions.py` at line 31.",
     "`FrozenAttributeError` is in `attr/exceptions.py` at line 31.",
     "Can you find where `FrozenAttribuetError` is?", False),
    # A name counts as stated only as a whole word: `get` is not stated by `get_abstract`.
    ("It is in `svcs/_core.py` at line 779.",
     "`get` is in `svcs/_core.py` at line 779.", "Where is `get_abstract`?", False),
    # A question that states every fact keeps them all required.
    ("No, nothing there.", "No element in forms/contact.html has a `tabindex`.",
     "Does any element in forms/contact.html have a `tabindex`?", False),
])
def test_facts_the_question_states_are_not_required(output: str, expected: str, question: str,
                                                    ok: bool) -> None:
    assert ev.match_answer(output, expected, question).ok is ok


_QUOTED = ("`Registry.close` is in `svcs/_core.py` at line 40:\n\n```\n40:     def close(self) -> None:\n"
           "41:         for cb in self._on_close:\n42: \n43:             cb()\n```")


@pytest.mark.parametrize("output, ok", [
    (_QUOTED, True),  # the expected answer itself: read_file's lines as printed
    # the same code dedented and without the numbers (the rule baseline's form)
    ("`Registry.close` is in `svcs/_core.py` at line 40:\n\n```python\ndef close(self) -> None:\n"
     "    for cb in self._on_close:\n\n        cb()\n```", True),
    # a line dropped is a line missing, numbered or not
    ("`Registry.close` is in `svcs/_core.py` at line 40:\n\n```\n40:     def close(self) -> None:\n"
     "43:             cb()\n```", False),
    # the quote alone does not answer: the path it is in is a fact too
    ("```\n40:     def close(self) -> None:\n41:         for cb in self._on_close:\n"
     "43:             cb()\n```", False),
])
def test_a_numbered_quote_is_scored_by_its_code(output: str, ok: bool) -> None:
    assert ev.answer_facts(_QUOTED)[2:5] == ["def close(self) -> None:", "for cb in self._on_close:",
                                             "cb()"]
    assert ev.match_answer(output, _QUOTED, "Show me `Registry.close`.").ok is ok


def _top_adapter(micro: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter on the top block only, with random (non-zero) weights."""
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = mlx_lm.load(str(micro))
    model.freeze()
    params = {"rank": 4, "dropout": 0.0, "scale": 10.0}
    linear_to_lora_layers(model, 1, params)
    mx.random.seed(seed)
    weights = {k: mx.random.normal(v.shape) * 0.5 for k, v in tree_flatten(model.trainable_parameters())}
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": params}))
    return out


@pytest.mark.parametrize("step", [512, 7])
def test_rows_sharing_the_frozen_prefill_give_the_outputs_they_give_alone(
        micro: Path, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Asserts: with a shared prefill store (codeadapt.models.prefill), the base row computes and
    stores the bottom block's chunks and returns its own outputs token for token; two adapters
    on the top block (different weights, different outputs) then load every chunk, compute none,
    and return exactly what they return without the store; prompts chunked otherwise (another
    order, so other chunk boundaries) are other keys, not a near-miss of these; a truncated
    chunk file is recomputed. step 7 splits prompts into many chunks."""
    from codeadapt.models import prefill

    monkeypatch.setattr(gm, "PREFILL_STEP", step)
    ps = _varied_prompts(repo)
    root = tmp_path / "prefill"
    rows = {"base": None, "a": _top_adapter(micro, tmp_path / "a", 1),
            "b": _top_adapter(micro, tmp_path / "b", 2)}
    alone, shared_out, stats = {}, {}, {}
    for name, adapter_dir in rows.items():
        model, tokenizer, _, _ = gm.load_for_generation(micro, adapter_dir)
        alone[name] = gm.generate_outputs(model, tokenizer, ps, 12, batch_size=3).texts
        shared = prefill.for_row(model, micro, adapter_dir, root, 1, True)
        assert shared is not None and shared.n == 1
        shared_out[name] = gm.generate_outputs(model, tokenizer, ps, 12, batch_size=3,
                                               shared=shared).texts
        stats[name] = (shared.loaded, shared.computed)
    assert alone["a"] != alone["base"] and alone["a"] != alone["b"]
    assert shared_out == alone
    chunks = stats["base"][1]
    assert chunks > 0 and stats["base"][0] == 0
    assert stats["a"] == stats["b"] == (chunks, 0)
    files = sorted(root.glob("*/*.npz"))
    assert len(files) == chunks == len(list(root.glob("*/*")))  # nothing but the chunks: no temp left

    model, tokenizer, _, _ = gm.load_for_generation(micro, rows["a"])
    # The same tokens reached through other chunk boundaries are other keys.
    from mlx_lm.models.cache import make_prompt_cache

    ids = gm.prompt_ids(tokenizer, ps[0])
    keys = []
    for cut in (5, 9):
        sb = prefill.for_row(model, micro, rows["a"], tmp_path / "lineage", 1, True)
        cache = make_prompt_cache(model)
        gm._prefill(model, cache, ids, 0, cut, step=100, shared=sb)
        gm._prefill(model, cache, ids, cut, 12, step=100, shared=sb)
        gm._prefill(model, cache, ids, 12, 20, step=100, shared=sb)
        keys.append(sb.computed)
    assert keys == [3, 3] and len(list((tmp_path / "lineage").glob("*/*.npz"))) == 6
    files[0].write_bytes(files[0].read_bytes()[:64])
    again = prefill.for_row(model, micro, rows["a"], root, 1, True)
    assert gm.generate_outputs(model, tokenizer, ps, 12, batch_size=3, shared=again).texts == alone["a"]
    assert again.computed == 1 and again.loaded == chunks - 1
    n = len(list(root.glob("*/*.npz")))
    assert prefill.prune(root) == 0 and prefill.prune(root, 0) == n > 0
    assert not list(root.glob("*/*.npz"))
    # Nothing shared: no store, or an adapter that adapts every block.
    assert prefill.for_row(model, micro, rows["a"], None, 1, True) is None
    assert prefill.for_row(model, micro, None, root, 2, True) is None
