"""Scoring held-out tool-use turns: parse the tool call the chat template defines, score it
against the expected turn (running both calls with `codeadapt.tools`), and summarise with
Wilson intervals on a clustered effective sample size (`effective_n`).

Every prompt is one assistant turn, which expects either a tool call or a direct/final answer.
Metrics (`summarize`; each a rate with a 95% Wilson interval, over the turns it applies to):

- `tool_call` (the headline "accuracy"), over turns that expect a call: the output is a
  well-formed call (`format`) to the expected tool (`name`) with matching arguments
  (`arguments`: equal after filling defaults and normalising paths and integers; for grep,
  also a different pattern that finds the same, non-empty, lines on the checkout; for
  read_file, also a range of the same file that shows every expected line and at most
  `READ_SLACK` more, by coverage) and nothing
  after it (`stop`: no extra text, no invented tool response or next turn).
- `answer`, over turns that expect an answer: no tool-call markup and nothing invented
  (well-formed, no call, `stop`), and the text matches the expected answer. The expected
  answer's *fact tokens* are its backticked spans and fenced code lines (a quote of
  read_file's numbered lines without the numbers, so any faithful quote matches), double-quoted
  strings, file paths, and numbers (`answer_facts`); every one must appear in the output
  (whitespace-normalised substring; numbers as whole numbers, so "10" doesn't match "1"),
  except names and paths the question itself states (`beyond_question`: an echo is not
  information), unless it states them all.
  An expected answer with no fact tokens (a free-text paraphrase, e.g. of a docstring) is
  matched by bag-of-words token F1 >= 0.5 instead (`ANSWER_F1`); `answer_rule` says which.
  An answer fails first when its first sentence has the opposite yes/no polarity
  (`polarity`), when it only repeats the question (token F1 >= 0.8 against it), or when most
  of its lines are lines of the last tool result (a paste carries the facts without answering).
- `correct` (overall), over all turns: the turn's own criterion, `tool_call` or `answer`.
- `decision` (call vs answer), `format`, `stop`: over all turns; `name`, `arguments`: over
  turns that expect a call; `executed_ok`: over the model's calls that were run.

A model that never produces a right call or a grounded answer scores 0 on `tool_call`,
`answer` and `correct`, however often it happens to pick "answer" (`decision`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from codeadapt import tools
from codeadapt.prompts import Prompt

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
# Text a model must never write itself: a tool's reply or the start of another turn.
FABRICATED = ("<tool_response>", "</tool_response>", "<|im_start|>")
NO_MATCHES = tools.NO_MATCHES
ADAPTER_FILE = "adapters.safetensors"
# Per-prompt checks (see the module docstring for what each one counts); "tool_call" is the
# headline accuracy, "correct" the overall one.
METRICS = ("tool_call", "correct", "decision", "format", "name", "arguments", "stop", "answer",
           "executed_ok")
ANSWER_F1 = 0.5  # token F1 an answer needs when the expected answer has no fact tokens


# ---- parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Markers:
    """How a template wraps a tool call, and the parser for the text between the tags."""

    start: str = TOOL_CALL_START
    end: str = TOOL_CALL_END
    parser: Callable[[str, Any], Any] | None = None  # None: JSON

    def parse(self, text: str, tool_list: Any = None) -> Any:
        return self.parser(text, tool_list) if self.parser else json.loads(text.strip())


def markers_of(tokenizer_or_markers: Any) -> Markers:
    """Markers from an mlx-lm TokenizerWrapper's tool parser, else our template's defaults."""
    if isinstance(tokenizer_or_markers, Markers):
        return tokenizer_or_markers
    if getattr(tokenizer_or_markers, "has_tool_calling", False):
        t = tokenizer_or_markers
        return Markers(t.tool_call_start, t.tool_call_end, t.tool_parser)
    return Markers()


@dataclass(frozen=True, slots=True)
class Parsed:
    format_valid: bool
    is_tool_call: bool
    name: str | None = None
    arguments: Any = None  # a dict when valid; whatever the model wrote otherwise
    extra_text_after_call: str = ""
    fabricated_response: bool = False
    error: str = ""
    answer_text: str = ""  # the stripped text when there is no tool call


def parse_output(text: str, tokenizer_or_markers: Any = None, tool_list: Any = None) -> Parsed:
    """Split a completion into a tool call (first one) or a direct answer, and say what's wrong."""
    mk = markers_of(tokenizer_or_markers)
    fabricated = any(tag in text for tag in FABRICATED)
    start = text.find(mk.start)
    if start < 0:
        if mk.end in text:
            return Parsed(False, False, fabricated_response=fabricated,
                          error=f"stray {mk.end} without {mk.start}", answer_text=text.strip())
        if not text.strip():
            return Parsed(False, False, error="empty output")
        return Parsed(True, False, fabricated_response=fabricated, answer_text=text.strip())
    end = text.find(mk.end, start + len(mk.start))
    if end < 0:
        return Parsed(False, True, fabricated_response=fabricated,
                      error=f"truncated tool call: no {mk.end}")
    extra = text[end + len(mk.end):].strip()
    base = {"is_tool_call": True, "extra_text_after_call": extra, "fabricated_response": fabricated}
    try:
        call = mk.parse(text[start + len(mk.start):end], tool_list)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        return Parsed(False, error=f"unparsable tool call: {exc}", **base)
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return Parsed(False, error="tool call is not an object with a string 'name'", **base)
    args = call.get("arguments")
    if not isinstance(args, dict):
        return Parsed(False, name=call["name"], arguments=args,
                      error=f"arguments must be a JSON object, got {type(args).__name__}", **base)
    return Parsed(True, name=call["name"], arguments=args, **base)


# ---- scoring ---------------------------------------------------------------------------------


def _as_int(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v):
        return int(v)
    return v


def _norm_path(v: Any) -> Any:
    # "./svcs/" == "svcs"; ".." stays so a refused path never equals an allowed one.
    return PurePosixPath(v).as_posix() if isinstance(v, str) else v


def normalize_arguments(name: str, args: Any) -> Any:
    """Arguments with the tool's defaults filled and equivalent spellings unified."""
    if not isinstance(args, dict):
        return args
    out = dict(args)
    if name == "grep":
        out["path"] = _norm_path(out.get("path") or ".")
        out["glob"] = out.get("glob") or None
    elif name == "read_file":
        out["path"] = _norm_path(out.get("path"))
        out["start_line"] = _as_int(out.get("start_line", 1))
        out["end_line"] = _as_int(out.get("end_line"))
    return out


def _same(a: Any, b: Any) -> bool:
    # As JSON, so `true` never equals 1 the way Python's True == 1 does.
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# Fenced code, a backticked span or a double-quoted string: whichever starts first wins, so
# `lang="en"` is one fact and so is a quoted docstring with backticks inside.
_QUOTE = re.compile(r"```[^\n]*\n(?P<code>.*?)```|`(?P<tick>[^`\n]+)`|\"(?P<quote>[^\"\n]+)\"", re.S)
_PATH = re.compile(r"(?<![\w/.-])/?(?:[\w.-]+/)+[\w.-]*\w\.\w+"  # a/b.py, /img/x.svg
                   r"|\b[\w-]+\.(?:py|pyi|html?|css|js|ts|json|toml|cfg|ini|txt|md|rst|ya?ml)\b")
_NUMBERED = re.compile(r"^\d+: ?")  # a read_file line's prefix
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?!\w)")
_WORDS = re.compile(r"\w+")


def _squash(text: str) -> str:
    return " ".join(text.split())


def answer_facts(expected: str) -> list[str]:
    """The fact tokens of an expected answer, in order: fenced code lines, backticked spans and
    double-quoted strings; then file paths; then numbers. Each kind is cut out of the text
    before the next is looked for, so `v1/types.py` yields no number."""
    facts: list[str] = []
    for m in _QUOTE.finditer(expected):
        span = next(g for g in m.groups() if g is not None)
        lines = [x for x in span.splitlines() if x.strip()]
        if m.group("code") is not None and lines and all(_NUMBERED.match(x) for x in lines):
            lines = [_NUMBERED.sub("", x) for x in lines]  # a quote of read_file's `N: ` lines
        facts += [_squash(x) for x in lines if x.strip()]
    rest = _QUOTE.sub(" ", expected)
    for rx in (_PATH, _NUMBER):
        facts += rx.findall(rest)
        rest = rx.sub(" ", rest)
    return list(dict.fromkeys(facts))


def token_f1(predicted: str, expected: str) -> float:
    """Bag-of-words F1 of lower-cased word tokens (SQuAD style)."""
    pred, gold = _WORDS.findall(predicted.lower()), _WORDS.findall(expected.lower())
    common = sum((Counter(pred) & Counter(gold)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True, slots=True)
class AnswerMatch:
    ok: bool
    rule: str  # "facts"; "f1" when the expected answer has no fact tokens; or why it failed
    # before the facts were looked at: "polarity", "repeats_question", "pastes_tool_result"
    missing: tuple[str, ...] = ()  # facts not found in the output
    f1: float | None = None


_NEG = re.compile(r"^(no|none|nothing|neither)\b|\b(no|not|none|never|without)\b|n't\b", re.I)
_YES = re.compile(r"^(yes|yep|correct|it does|they do)\b", re.I)


def polarity(text: str) -> str | None:
    """"yes", "no" or None for the first sentence of an answer."""
    first = re.split(r"(?<=[.!?:])\s|\n", text.strip(), maxsplit=1)[0]
    if _YES.search(first):
        return "yes"
    if _NEG.search(first):
        return "no"
    return None


def _pasted(output: str, tool_result: str) -> bool:
    """Is the output mostly lines copied from the tool result (`path:line:text`, `N: text`)?"""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    source = {ln.strip() for ln in tool_result.splitlines() if ln.strip()}
    return bool(lines) and sum(ln in source for ln in lines) * 2 >= len(lines)


def beyond_question(facts: list[str], question: str) -> list[str]:
    """The facts an answer must give: those the question does not already state. A name or path
    the question names is an echo, not information — "`get_registered_service_for` is in
    `svcs/_core.py` at line 446" with the right code answers "Open the
    `Registry.get_registered_service_for` method" — so it is not required, unless the question
    states every fact (then all stay required: nothing else could show the answer is right).
    Numbers always stay; a name counts as stated only as a whole word of the question."""
    asked = _squash(question)
    new = [f for f in facts if _NUMBER.fullmatch(f)
           or not re.search(rf"(?<![\w.]){re.escape(f)}(?![\w])", asked)]
    return new if new and question else facts


def match_answer(output: str, expected: str, question: str = "", tool_result: str = ""
                 ) -> AnswerMatch:
    """Does a direct answer state what the expected answer states? See the module docstring.
    Besides the facts: an answer of the opposite polarity (yes/no) is wrong, and so is one that
    only repeats the question or pastes the last tool result — those carry the facts without
    answering."""
    if question and token_f1(output, question) >= 0.8:
        return AnswerMatch(False, "repeats_question")
    if tool_result and _pasted(output, tool_result) and not _pasted(expected, tool_result):
        return AnswerMatch(False, "pastes_tool_result")
    want, got = polarity(expected), polarity(output)
    if want and got and want != got:
        return AnswerMatch(False, "polarity")
    facts = beyond_question(answer_facts(expected), question)
    if not facts:
        if not _WORDS.search(expected):  # nothing to compare against
            return AnswerMatch(bool(output.strip()), "f1")
        f1 = token_f1(output, expected)
        return AnswerMatch(f1 >= ANSWER_F1, "f1", f1=round(f1, 4))
    text = _squash(output)
    numbers = set(_NUMBER.findall(output))
    missing = tuple(f for f in facts
                    if (f not in numbers if _NUMBER.fullmatch(f) else f not in text))
    return AnswerMatch(not missing, "facts", missing)


def run_call(root: str | Path, name: str, arguments: Any) -> str:
    """`tools.execute`, with the regex failures it lets escape turned into error text."""
    try:
        return tools.execute(root, name, arguments)
    except (OverflowError, RecursionError, re.error, ValueError) as exc:
        return f"error: {exc}"


READ_SLACK = (2.0, 10)  # a read may show up to 2x the expected lines + 10 and still count


def shown_lines(read_result: str) -> tuple[int, int] | None:
    """First and last line number a read_file result shows; None for an error or nothing."""
    nums = [int(m[1]) for m in re.finditer(r"(?m)^(\d+): ", read_result)]
    if read_result.startswith("error:") or not nums:
        return None
    return nums[0], nums[-1]


def covers(got: str, want: str, got_path: Any, want_path: Any) -> bool:
    """A read_file call is right when it shows the same file, every line the expected call
    shows, and not more than `READ_SLACK` allows (reading the whole file is not finding the
    function)."""
    g, w = shown_lines(got), shown_lines(want)
    if g is None or w is None or got_path != want_path:
        return False
    factor, extra = READ_SLACK
    size = w[1] - w[0] + 1
    return g[0] <= w[0] and g[1] >= w[1] and g[1] - g[0] + 1 <= factor * size + extra


def finds_target(got: str, target: str) -> bool:
    """A search the expected step would still have to refine is right when it already finds
    every line the refined search finds, and not more than `READ_SLACK` allows of other lines
    (grepping a common word is not finding the definition)."""
    if got.startswith("error:") or target.startswith("error:") or NO_MATCHES in (got, target):
        return False
    hits, want = got.splitlines(), target.splitlines()
    if any(line.startswith("... ") for line in hits + want):  # truncated: the lines are unknown
        return False
    factor, extra = READ_SLACK
    return set(want) <= set(hits) and len(hits) <= factor * len(want) + extra


@dataclass(frozen=True, slots=True)
class Scored:
    correct: bool  # tool_call or answer, whichever the turn expects
    format: bool
    decision: bool
    name: bool | None  # None: no call expected
    arguments: bool | None
    stop: bool
    executed: bool  # the model's call parsed and was run
    exec_error: bool | None
    tool_output: str | None
    failure: str  # first failed check, "" when correct
    tool_call: bool | None = None  # None: an answer expected
    answer: bool | None = None  # None: a call expected
    answer_rule: str | None = None  # "facts" or "f1"
    answer_missing: tuple[str, ...] = ()
    answer_f1: float | None = None


def score(prompt: Prompt, parsed: Parsed, root: str | Path | None = None) -> Scored:
    """Check one parsed completion against its prompt; run calls in `root` when given."""
    decision = parsed.is_tool_call == prompt.expects_call
    stop = not parsed.extra_text_after_call and not parsed.fabricated_response
    output = None
    if root is not None and parsed.is_tool_call and parsed.name is not None:
        output = run_call(root, parsed.name, parsed.arguments)
    name_ok = args_ok = None
    if prompt.expects_call:
        name_ok = parsed.is_tool_call and parsed.name == prompt.expected_name
        args_ok = bool(name_ok) and isinstance(parsed.arguments, dict) and _same(
            normalize_arguments(parsed.name, parsed.arguments),
            normalize_arguments(prompt.expected_name, prompt.expected_arguments))
        if name_ok and not args_ok and prompt.expected_name == "grep" and output is not None:
            # Two patterns that find the same lines are the same search.
            want = run_call(root, "grep", prompt.expected_arguments)
            args_ok = output == want and not want.startswith("error:") and want != NO_MATCHES
            if not args_ok and prompt.refined_to is not None:
                args_ok = finds_target(output, run_call(root, "grep", prompt.refined_to))
        elif (name_ok and not args_ok and prompt.expected_name == "read_file" and output is not None
              and isinstance(parsed.arguments, dict)):
            args_ok = covers(output, run_call(root, "read_file", prompt.expected_arguments),
                             _norm_path(parsed.arguments.get("path")),
                             _norm_path(prompt.expected_arguments.get("path")))
    match = None
    if not prompt.expects_call:
        question = next((m.get("content") or "" for m in reversed(prompt.messages)
                         if m.get("role") == "user"), "")
        last = prompt.messages[-1] if prompt.messages else {}
        match = match_answer(parsed.answer_text, prompt.expected_text, question,
                             (last.get("content") or "") if last.get("role") == "tool" else "")
    checks = [("format", parsed.format_valid), ("decision", decision), ("name", name_ok),
              ("arguments", args_ok), ("stop", stop),
              ("answer", None if match is None else match.ok)]
    failure = next((k for k, ok in checks if ok is False), "")
    correct = not failure
    return Scored(correct=correct, format=parsed.format_valid, decision=decision,
                  name=name_ok, arguments=args_ok, stop=stop, executed=output is not None,
                  exec_error=None if output is None else output.startswith("error:"),
                  tool_output=None if output is None else output[:1000], failure=failure,
                  tool_call=correct if prompt.expects_call else None,
                  answer=None if prompt.expects_call else correct,
                  answer_rule=None if match is None else match.rule,
                  answer_missing=() if match is None else match.missing,
                  answer_f1=None if match is None else match.f1)


# ---- statistics ------------------------------------------------------------------------------


def wilson(k: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (n may be an effective, non-integer
    sample size); (0, 1) when n is 0."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def effective_n(vals: Sequence[bool], groups: Sequence[str]) -> float:
    """Sample size after clustering: n / design effect, with the design effect the variance of
    the mean under clustering by `groups` (between-group, ratio estimator) over the variance if
    every turn were independent, at least 1. Turns of one file share its quirks; scoring them
    as independent would overstate the precision. When every turn agrees the variance says
    nothing, and the number of groups is used."""
    n = len(vals)
    if n == 0:
        return 0.0
    totals: dict[str, list[int]] = {}
    for v, g in zip(vals, groups):
        t = totals.setdefault(g, [0, 0])
        t[0] += bool(v)
        t[1] += 1
    c, p = len(totals), sum(vals) / n
    if p in (0.0, 1.0) or c < 2:
        return float(c)
    var_cluster = c / (c - 1) * sum((k - p * m) ** 2 for k, m in totals.values()) / n**2
    deff = max(var_cluster / (p * (1 - p) / n), 1.0)
    return n / deff


def summarize(scores: Sequence[Scored], z: float = 1.96, groups: Sequence[str] | None = None
              ) -> dict[str, dict[str, Any]]:
    """Rate per metric (`METRICS`) with a 95% Wilson interval on the effective sample size
    (`effective_n`, clustered by `groups`, e.g. the source file of each turn; every turn its
    own group when None), each over the turns it applies to; "answer" also counts how many
    answer turns were judged by token F1 (`f1_rule`)."""
    clustered = groups is not None
    groups = list(groups) if groups is not None else [str(i) for i in range(len(scores))]
    out: dict[str, dict[str, Any]] = {}
    for m in METRICS:
        if m == "executed_ok":
            pairs = [(not s.exec_error, g) for s, g in zip(scores, groups) if s.executed]
        else:
            pairs = [(getattr(s, m), g) for s, g in zip(scores, groups) if getattr(s, m) is not None]
        vals = [v for v, _ in pairs]
        k, n = sum(vals), len(vals)
        n_eff = effective_n(vals, [g for _, g in pairs]) if clustered else float(n)
        lo, hi = wilson(k / n * n_eff if n else 0, n_eff, z)
        out[m] = {"k": k, "n": n, "accuracy": k / n if n else None, "lo": lo, "hi": hi,
                  "n_eff": round(n_eff, 1), "groups": len({g for _, g in pairs})}
    out["answer"]["f1_rule"] = sum(s.answer_rule == "f1" for s in scores)
    return out
