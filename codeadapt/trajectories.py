"""Multi-step Python conversations: a follow-up question that builds on an earlier result,
and a search that misses and is refined.

- `followup_read`: "Where is X defined?" → grep → the location; then "show me its code" →
  read_file from the line the grep showed (nothing new to search) → the code.
- `grep_refine`: the user mistypes a name (two letters swapped); the definition search finds
  nothing, so the model searches again for definitions that start with the part before the
  typo and answers with what that finds. The refined pattern is a rule the model can apply to
  any miss: keep the name up to the first letter it cannot trust.
- `find_behaviour`: the question describes what a definition does (its docstring's first
  sentence, verb re-inflected) without naming it; in half of them the model first greps the
  question's opening words, which the code does not contain ("No matches."), then picks a
  distinctive phrase of the description to grep for, reads from the one hit's line alone
  (read_file then shows the whole definition that holds it, `tools.enclosing_span`: no
  arithmetic on line numbers) and names the definition it found.
- `followup_params` / `followup_decorated`: after "show me X" (grep → read → code), a second
  question whose answer is already on screen (X's parameters; whether and how it is
  decorated) is answered from that read with no new call.

Every call runs on the checkout and must agree with the parse, as in `codeadapt.examples`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import zip_longest

from codeadapt import chat, tools, wordings
from codeadapt.examples import (
    Ctx,
    _candidates,
    _defined_answer,
    _grep,
    _public,
    _read_trajectory,
    _usable_doc,
    clean_doc,
    code_of,
    definition_pattern,
    show_answer,
)
from codeadapt.records import Example

MIN_PREFIX = 4  # a refined search keeps at least this much of the name


def gen_followup_read(ctx: Ctx) -> Iterator[Example | None]:
    """Two questions: where X is, then its code, read from the first answer's grep hit."""
    want = lambda s: s.kind in {"class", "function"} and _public(s)  # noqa: E731
    for s in _candidates(ctx, "followup_read", want):
        got = _read_trajectory(ctx, "followup_read", s)
        if got is None:
            yield None
            continue
        msgs, rres = got  # user, grep call, its one hit, read_file call from that hit, result
        first = ctx.question(f"grep_{s.kind}", s.name, s.path, s.start_line)
        where = _defined_answer(s.name, "The class" if s.kind == "class" else "The function")(
            [(s.path, s.def_line, "")])
        follow = wordings.pick("followup_read", ctx.rng("followup_read", s.qualname, "q2"),
                               ctx.in_test(s.path, s.start_line))
        convo = [chat.user(first), msgs[1], msgs[2], chat.assistant(where), chat.user(follow),
                 msgs[3], msgs[4], chat.assistant(show_answer(s, rres))]
        yield ctx.example(convo, "followup_read", s.path, s.start_line, s.end_line)


def mistyped(name: str, at: int) -> str:
    """`name` with the letters at `at` and `at + 1` swapped."""
    return name[:at] + name[at + 1] + name[at] + name[at + 2:]


def refine_pattern(prefix: str) -> str:
    return rf"^\s*(class|def|async def) {re.escape(prefix)}\w*"


def gen_grep_refine(ctx: Ctx) -> Iterator[Example | None]:
    """A mistyped name: the exact search misses, the prefix search finds the definition."""
    want = lambda s: s.kind in {"class", "function"} and _public(s) and len(s.name) >= 2 * MIN_PREFIX  # noqa: E731
    for s in _candidates(ctx, "grep_refine", want):
        rng = ctx.rng("grep_refine", s.qualname, "typo")
        at = rng.randrange(max(MIN_PREFIX, len(s.name) // 2), len(s.name) - 1)
        typo = mistyped(s.name, at)
        if typo == s.name:
            yield None
            continue
        first = {"pattern": definition_pattern(typo), "glob": "*.py"}
        miss = tools.execute(ctx.root, "grep", first)
        if miss != "No matches.":
            ctx.stats["dropped_typo_matches"] += 1
            yield None
            continue
        second = {"pattern": refine_pattern(s.name[:at]), "glob": "*.py"}
        got = _grep(ctx, second)
        if got is None:
            yield None
            continue
        result, hits = got
        if (s.path, s.def_line) not in {(p, n) for p, n, _ in hits}:
            ctx.stats["dropped_grep_disagrees_with_parse"] += 1
            yield None
            continue
        question = ctx.question(f"grep_{s.kind}", typo, s.path, s.start_line)
        msgs = [chat.user(question), chat.tool_call("call_1", "grep", first),
                chat.tool_result("call_1", "grep", miss), chat.tool_call("call_2", "grep", second),
                chat.tool_result("call_2", "grep", result), chat.assistant(refine_answer(typo, s.name[:at], hits))]
        yield ctx.example(msgs, "grep_refine", s.path, s.start_line, s.end_line)


def refine_answer(typo: str, prefix: str, hits: list[tuple[str, int, str]]) -> str:
    """What the refined search found, the name the user most likely meant first (the one hit
    that is the typed name with two adjacent letters swapped back)."""
    names = [m[2] if (m := re.match(r"\s*(class|def|async def) (\w+)", t)) else "?" for _, _, t in hits]
    meant = [(nm, p, n) for nm, (p, n, _) in zip(names, hits)
             if any(mistyped(nm, i) == typo for i in range(len(nm) - 1))]
    if len(hits) == 1:
        p, n, _ = hits[0]
        return (f"Nothing is named `{typo}`; the only definition starting with `{prefix}` is "
                f"`{names[0]}`, in `{p}` at line {n}.")
    items = "\n".join(f"- `{nm}`: `{p}`, line {n}" for nm, (p, n, _) in zip(names, hits))
    likely = (f" You probably mean `{meant[0][0]}` (`{meant[0][1]}`, line {meant[0][2]})."
              if len(meant) == 1 else "")
    return f"Nothing is named `{typo}`.{likely} Definitions starting with `{prefix}`:\n{items}"


MAX_PHRASE_TRIES = 6  # greps tried per described definition before giving up on it
MISS_SHARE = 0.5  # of behaviour questions first search the question's own words (kept when they miss)
MISS_WORDS = 3
_STOP = frozenset("a an the of to and or for in on by with from as is be it its this that these "
                  "those into at if not no all any".split())
VERBS = frozenset("""add apply build call check clean close collect compare compute configure convert
copy create decode delete detect determine dispatch emit encode ensure escape evaluate execute
extract fetch fill filter find format generate get handle initialize initialise insert inspect
install iterate join load look make mark match merge normalize normalise open parse patch perform
prepare print process produce raise read receive record register reload remove render replace
reset resolve restore retrieve return run save scan search select send serialize set show sort
split start stop store strip turn unwrap update upload validate verify wait walk wrap write
yield""".split())
_DEF_LINE = re.compile(r"^\d+: \s*(?:async\s+def|def|class)\s+(\w+)")


def third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "z")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in ("a", "e", "i", "o", "u"):
        return verb[:-1] + "ies"
    return verb + "s"


_THIRD = {third_person(v): v for v in VERBS}


def enclosing_definition(read_result: str, line: int) -> tuple[str, int] | None:
    """(name, line) of the last `def`/`class` a read_file result shows at or above `line`."""
    found = None
    for ln in read_result.splitlines():
        m = _DEF_LINE.match(ln)
        if m and int(ln.split(":", 1)[0]) <= line:
            found = m[1], int(ln.split(":", 1)[0])
    return found


def describe(doc: str, name: str) -> tuple[str, str, str] | None:
    """(base-form clause, third-person clause, the sentence) for a docstring whose first
    sentence starts with a verb ("Return the app." -> "return the app", "returns the app");
    None when it does not, is too short or long, or names the definition itself."""
    sentence = re.split(r"(?<=[.!?])\s", clean_doc(doc))[0].rstrip(".!?")
    words = re.split(r"[;:]|\s[(\u2014-]", sentence)[0].split()  # the main clause
    if not 4 <= len(words) <= 16:
        return None
    first = words[0].lower()
    verb = first if first in VERBS else _THIRD.get(first)
    rest = " ".join(words[1:])
    # the verb too: "Parse the source." would ask which function parses it, of `parse`
    if verb is None or name.lower() in f"{verb} {rest}".lower() or "`" in rest:
        return None
    return f"{verb} {rest}", f"{third_person(verb)} {rest}", sentence


def phrases(clause: str) -> Iterator[str]:
    """Search phrases from a description, two words before three, in reading order: runs of
    plain words that neither start nor end with a stop word."""
    words = clause.split()[1:]  # not the verb: its form in the code is unknown
    for n in (2, 3):
        for i in range(len(words) - n + 1):
            run = words[i:i + n]
            if (all(re.fullmatch(r"[A-Za-z]{2,}", w) for w in run) and run[0].lower() not in _STOP
                    and run[-1].lower() not in _STOP and max(map(len, run)) >= 4):
                yield " ".join(run)


def gen_find_behaviour(ctx: Ctx) -> Iterator[Example | None]:
    """"Which function parses the request body?" → grep a phrase of it → read around the hit
    → the definition that encloses it."""
    def want(s) -> bool:
        return s.kind in {"function", "method"} and _public(s) and _usable_doc(s.docstring)

    for s in _candidates(ctx, "find_behaviour", want):
        if s.end_line - s.start_line + 1 > ctx.limits.max_read_lines:  # the read shows it all
            ctx.stats["dropped_span_too_long"] += 1
            yield None
            continue
        described = describe(s.docstring, s.name)
        if described is None:
            ctx.stats["dropped_doc_not_a_description"] += 1
            yield None
            continue
        did, does, sentence = described
        found = None
        for phrase in list(phrases(did))[:MAX_PHRASE_TRIES]:
            got = _grep(ctx, {"pattern": phrase, "glob": "*.py"})
            if got is not None and len(got[1]) == 1:
                found = phrase, got
                break
        if found is None:
            ctx.stats["dropped_no_distinctive_phrase"] += 1
            yield None
            continue
        phrase, (gres, hits) = found
        path, line, _ = hits[0]
        rargs = {"path": path, "start_line": line}  # alone: the definition that holds the hit
        rres = tools.execute(ctx.root, "read_file", rargs)
        if (path, (s.name, s.def_line)) != (s.path, enclosing_definition(rres, line)) \
                or not s.def_line < line <= s.end_line:
            ctx.stats["dropped_phrase_not_in_its_docstring"] += 1
            yield None
            continue
        question = wordings.pick("find_behaviour", ctx.rng("find_behaviour", s.qualname, "phrase"),
                                 ctx.in_test(s.path, s.start_line), repo=ctx.source, did=did, does=does)
        answer = f"The {s.kind} `{s.name}` in `{s.path}`, line {s.def_line}. Its docstring: {sentence}."
        searches = [({"pattern": phrase, "glob": "*.py"}, gres)]
        if ctx.rng("find_behaviour", s.qualname, "miss").random() < MISS_SHARE:
            searches[:0] = _missed_search(ctx, question, does if does in question else did)
        msgs = [chat.user(question)]
        for i, (args, result) in enumerate(searches, 1):
            msgs += [chat.tool_call(f"call_{i}", "grep", args), chat.tool_result(f"call_{i}", "grep", result)]
        n = len(searches) + 1
        msgs += [chat.tool_call(f"call_{n}", "read_file", rargs),
                 chat.tool_result(f"call_{n}", "read_file", rres), chat.assistant(answer)]
        yield ctx.example(msgs, "find_behaviour", s.path, s.start_line, s.end_line)


def _missed_search(ctx: Ctx, question: str, clause: str) -> list[tuple[dict, str]]:
    """The search a person tries first, the question's own opening words (verb as worded:
    "returns the default"), when it finds nothing on the checkout (the question re-inflects
    the docstring's "Return the default"). [] when it finds something or the words are not
    plain. The phrase search that follows is the recovery a miss needs (stop 24's
    adapter answered "No matches." with invented locations: no training conversation had a
    miss followed by a different search of the same question)."""
    words = clause.split()[:MISS_WORDS]
    if len(words) < MISS_WORDS or not all(re.fullmatch(r"[A-Za-z]+", w) for w in words):
        return []
    args = {"pattern": " ".join(words), "glob": "*.py"}
    result = tools.execute(ctx.root, "grep", args)
    if result != "No matches.":
        ctx.stats["behaviour_question_words_found"] += 1
        return []
    ctx.stats["behaviour_question_words_missed"] += 1
    return [(args, result)]


def params_answer(s) -> str:
    params = [" ".join(p.split()) for p in s.parameters if p not in ("*", "/")]
    if not params:
        return f"`{s.name}` takes no parameters."
    return (f"`{s.name}` takes {len(params)} parameter{'s' * (len(params) > 1)}: "
            + ", ".join(f"`{p}`" for p in params) + ".")


def decorated_answer(s) -> str:
    if not s.decorators:
        return f"No, `{s.name}` has no decorators."
    return f"Yes: `{s.name}` is decorated with " + ", ".join(
        f"`@{' '.join(d.split())}`" for d in s.decorators) + "."


def _followups(ctx: Ctx, kind: str, cands, answer, shown) -> Iterator[Example | None]:
    """"Show me X" (grep → read → code), then a question answered from that read."""
    for s in cands:
        got = _read_trajectory(ctx, f"read_{s.kind}", s)
        if got is None or not shown(s, "\n".join(code_of(got[1]))):
            ctx.stats["dropped_followup_not_on_screen"] += got is not None
            yield None
            continue
        msgs, rres = got
        follow = wordings.pick(kind, ctx.rng(kind, s.qualname, "q2"), ctx.in_test(s.path, s.start_line))
        convo = [*msgs, chat.assistant(show_answer(s, rres)), chat.user(follow), chat.assistant(answer(s))]
        yield ctx.example(convo, kind, s.path, s.start_line, s.end_line)


def gen_followup_params(ctx: Ctx) -> Iterator[Example | None]:
    want = lambda s: s.kind in {"function", "method"} and _public(s)  # noqa: E731
    return _followups(ctx, "followup_params", _candidates(ctx, "followup_params", want),
                      params_answer, lambda s, code: all(p in code for p in s.parameters))


def gen_followup_decorated(ctx: Ctx) -> Iterator[Example | None]:
    """Decorated and plain definitions alternate, so "yes" and "no" are both taught."""
    want = lambda s: s.kind in {"class", "function", "method"} and _public(s)  # noqa: E731
    cands = _candidates(ctx, "followup_decorated", want)
    yes, no = [s for s in cands if s.decorators], [s for s in cands if not s.decorators]
    mixed = [s for pair in zip_longest(yes, no) for s in pair if s is not None]
    return _followups(ctx, "followup_decorated", mixed, decorated_answer,
                      lambda s, code: all("@" + d.splitlines()[0] in code for d in s.decorators))


GENERATORS = {"followup_read": gen_followup_read, "grep_refine": gen_grep_refine,
              "find_behaviour": gen_find_behaviour, "followup_params": gen_followup_params,
              "followup_decorated": gen_followup_decorated}
