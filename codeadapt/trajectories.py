"""Multi-step Python conversations: a follow-up question that builds on an earlier result,
and a search that misses and is refined.

- `followup_read`: "Where is X defined?" → grep → the location; then "show me its code" →
  read_file from the line the grep showed (nothing new to search) → the code.
- `grep_refine`: the user mistypes a name (two letters swapped); the definition search finds
  nothing, so the model searches again for definitions that start with the part before the
  typo and answers with what that finds. The refined pattern is a rule the model can apply to
  any miss: keep the name up to the first letter it cannot trust.

Every call runs on the checkout and must agree with the parse, as in `codeadapt.examples`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from codeadapt import chat, tools, wordings
from codeadapt.examples import (
    Ctx,
    _candidates,
    _defined_answer,
    _grep,
    _public,
    _read_trajectory,
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


GENERATORS = {"followup_read": gen_followup_read, "grep_refine": gen_grep_refine}
