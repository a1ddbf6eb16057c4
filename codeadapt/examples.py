"""Grounded Python examples over one checkout: grep searches, and grep → read_file → answer
trajectories ("show me X", "what does X do?").

Each example starts from what tree-sitter found (a `Symbol`), runs the real tool on the
checkout, checks the result agrees with the parse, and writes an answer that only restates
tool results. Every call's arguments can be read off the question or an earlier result (the
read starts at the grep hit's line; the tool's default end is the end of that definition). A
repository fact is never answered without a call. A disagreement drops the example and counts
why.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from codeadapt import chat, tools, wordings
from codeadapt.dataset import SplitGroups, split_of
from codeadapt.records import Example, Extraction, Symbol

GENERATOR_VERSION = "12"  # v12: a set answer only where the grep finds exactly what the parse does
GREP_KINDS = ("grep_class", "grep_function", "grep_subclasses", "grep_decorator",
              "grep_importers", "grep_async", "grep_refine")
READ_KINDS = ("read_class", "read_function", "read_method", "followup_read", "followup_params",
              "followup_decorated")
EXPLAIN_KINDS = ("explain_symbol", "find_behaviour")
QUOTE_LINES = 8  # a "show me" answer quotes at most this many lines of what it read
HIT_RE = re.compile(r"^(?P<path>[^:\n]+):(?P<line>\d+):(?P<text>.*)$")

@dataclass(frozen=True, slots=True)
class Limits:
    max_read_lines: int = 80
    max_grep_hits: int = 20
    # The dataset's split (valid, test, salt): a test example gets a wording no train example
    # uses (`wordings.pick`), so the test measures phrasings never trained on. None: any wording.
    split: tuple[float, float, str] | None = None
    by_symbol: bool = False  # this source is split by top-level definition (`split.by_symbol`)


@dataclass(slots=True)
class Ctx:
    """What every generator needs: the checkout, its parse, limits and counters."""

    root: Path
    source: str
    commit: str
    extraction: Extraction
    limits: Limits
    seed: str
    stats: Counter[str]
    groups: SplitGroups = field(default_factory=SplitGroups)

    def rng(self, *key: object) -> random.Random:
        return random.Random(":".join(map(str, (self.seed, self.source, *key))))

    def in_test(self, path: str, line: int) -> bool:
        """Whether an example about `path`:`line` lands in the test split."""
        if self.limits.split is None:
            return False
        valid, test_share, salt = self.limits.split
        group = self.groups(self.root, path, line, self.limits.by_symbol)
        return split_of(self.source, group, valid, test_share, salt) == "test"

    def question(self, kind: str, name: str, path: str, line: int) -> str:
        return wordings.pick(kind, self.rng(kind, name, "phrase"), test=self.in_test(path, line),
                             name=name, repo=self.source)

    def example(self, messages: list[dict], kind: str, sym_path: str, start: int, end: int) -> Example:
        return Example(
            messages=tuple([chat.system(self.source), *messages]),
            tools=chat.tool_schemas(),
            source=self.source, commit=self.commit, path=sym_path,
            start_line=start, end_line=end, kind=kind, generator_version=GENERATOR_VERSION,
        )


def parse_hits(result: str) -> list[tuple[str, int, str]]:
    """(path, line, text) of each grep result line."""
    out = []
    for line in result.splitlines():
        m = HIT_RE.match(line)
        if m:
            out.append((m["path"], int(m["line"]), m["text"]))
    return out


def _grep(ctx: Ctx, args: dict) -> tuple[str, list[tuple[str, int, str]]] | None:
    """Run grep; None (counted) when the result is unusable for an example."""
    result = tools.execute(ctx.root, "grep", args)
    if result.startswith("error:"):
        ctx.stats["dropped_tool_error"] += 1
        return None
    hits = parse_hits(result)
    if not hits or "more matches not shown" in result or len(hits) > ctx.limits.max_grep_hits:
        ctx.stats["dropped_too_many_hits" if hits else "dropped_no_hits"] += 1
        return None
    return result, hits


def _loc_list(hits: list[tuple[str, int, str]]) -> str:
    return "\n".join(f"- `{p}`, line {n}" for p, n, _ in hits)


def _grep_example(ctx: Ctx, kind: str, name: str, args: dict, expect: set[tuple[str, int]],
                  answer: Callable[[list[tuple[str, int, str]]], str],
                  prov: tuple[str, int, int],
                  only: set[tuple[str, int]] | None = None) -> Example | None:
    """A grep and the answer it supports. `expect`: lines the parse says the search must find;
    `only`: for a set answer ("which classes subclass X"), the only lines it may find, so
    the list the answer writes is true (a docstring's `class Foo(X):` or `from x import y`,
    or `class A(B[X])`, matches the search but is not a subclass or an import)."""
    got = _grep(ctx, args)
    if got is None:
        return None
    result, hits = got
    found = {(p, n) for p, n, _ in hits}
    if not expect <= found:
        ctx.stats["dropped_grep_disagrees_with_parse"] += 1
        return None
    if only is not None and not found <= only:
        ctx.stats["dropped_grep_finds_more_than_parse"] += 1
        return None
    msgs = [chat.user(ctx.question(kind, name, prov[0], prov[1])), chat.tool_call("call_1", "grep", args),
            chat.tool_result("call_1", "grep", result), chat.assistant(answer(hits))]
    return ctx.example(msgs, kind, *prov)


def definition_pattern(name: str) -> str:
    """The one search for "where is X defined": class, def or async def, whichever X is. A
    question often does not say which ("what does `X` do?"), so one rule serves them all."""
    return rf"^\s*(class|def|async def) {name}\b"


def _defined_answer(name: str, what: str) -> Callable[[list[tuple[str, int, str]]], str]:
    def answer(hits: list[tuple[str, int, str]]) -> str:
        if len(hits) == 1:
            p, n, _ = hits[0]
            return f"{what} `{name}` is defined in `{p}` at line {n}."
        return f"`{name}` is defined in more than one place:\n{_loc_list(hits)}\n\n{_total(len(hits), 'place')}"
    return answer


def _total(n: int, noun: str, plural: str = "") -> str:
    """The count that closes a list answer. It comes after the list, not before: a model
    writes the items by copying the tool result line by line and counts what it wrote,
    where a count up front must be right before a single item is written (the phase-7
    adapter trained on count-first lists began all 15 of its counted agentic answers with
    "2", the commonest count in training, and 9 of 14 lists missed hits; README)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'} in all."


def _public(sym: Symbol) -> bool:
    return not any(part.startswith("_") for part in sym.qualname.split("."))


def gen_grep_class(ctx: Ctx) -> Iterator[Example | None]:
    for s in _candidates(ctx, "grep_class", lambda s: s.kind == "class" and _public(s)):
        args = {"pattern": definition_pattern(s.name), "glob": "*.py"}
        yield _grep_example(ctx, "grep_class", s.name, args, {(s.path, s.def_line)},
                            _defined_answer(s.name, "The class"), (s.path, s.start_line, s.end_line))


def gen_grep_function(ctx: Ctx) -> Iterator[Example | None]:
    for s in _candidates(ctx, "grep_function", lambda s: s.kind == "function" and _public(s)):
        args = {"pattern": definition_pattern(s.name), "glob": "*.py"}
        yield _grep_example(ctx, "grep_function", s.name, args, {(s.path, s.def_line)},
                            _defined_answer(s.name, "The function"), (s.path, s.start_line, s.end_line))


def _class_names(hits: list[tuple[str, int, str]]) -> list[tuple[str, str, int]]:
    out = []
    for p, n, text in hits:
        m = re.match(r"\s*class (\w+)", text)
        if m:
            out.append((m[1], p, n))
    return out


def gen_grep_subclasses(ctx: Ctx) -> Iterator[Example | None]:
    classes = [s for s in ctx.extraction.symbols() if s.kind == "class"]
    subs: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for c in classes:
        for b in c.bases:
            base = b.split("[")[0].split(".")[-1].strip()
            if re.fullmatch(r"\w+", base):
                subs[base].add((c.path, c.def_line))
    bases = {c.name: c for c in classes if c.name in subs and _public(c)}
    for name in _shuffled(ctx, "grep_subclasses", sorted(bases)):
        base = bases[name]

        def answer(hits: list[tuple[str, int, str]], name: str = name) -> str:
            found = _class_names(hits)
            lines = "\n".join(f"- `{c}` (`{p}`, line {n})" for c, p, n in found)
            return f"Classes that subclass `{name}`:\n{lines}\n\n{_total(len(found), 'class', 'classes')}"

        args = {"pattern": rf"^\s*class \w+\(.*\b{name}\b", "glob": "*.py"}
        yield _grep_example(ctx, "grep_subclasses", name, args, subs[name], answer,
                            (base.path, base.start_line, base.end_line), only=subs[name])


def gen_grep_decorator(ctx: Ctx) -> Iterator[Example | None]:
    uses: dict[str, set[tuple[str, int]]] = defaultdict(set)
    lines: dict[str, set[tuple[str, int]]] = defaultdict(set)  # where its `@` lines can be
    first: dict[str, Symbol] = {}
    for s in ctx.extraction.symbols():
        for d in s.decorators:
            name = d.split("(")[0].strip()
            if re.fullmatch(r"[A-Za-z_][\w.]*", name):
                uses[name].add((s.path, s.start_line))
                lines[name].update((s.path, n) for n in range(s.start_line, s.def_line))
                first.setdefault(name, s)
    names = [n for n, u in sorted(uses.items()) if 2 <= len(u) <= ctx.limits.max_grep_hits]
    for name in _shuffled(ctx, "grep_decorator", names):

        def answer(hits: list[tuple[str, int, str]], name: str = name) -> str:
            return f"`@{name}` is applied here:\n{_loc_list(hits)}\n\n{_total(len(hits), 'use')}"

        # Decorators sit on the first line of a decorated definition; grep must find them all.
        args = {"pattern": rf"^\s*@{re.escape(name)}\b", "glob": "*.py"}
        s = first[name]
        yield _grep_example(ctx, "grep_decorator", name, args, set(), answer,
                            (s.path, s.start_line, s.end_line), only=lines[name])


def gen_grep_importers(ctx: Ctx) -> Iterator[Example | None]:
    by_mod: dict[str, set[str]] = defaultdict(set)
    own: dict[str, set[tuple[str, int]]] = defaultdict(set)  # its import lines: all must be found
    stmts: dict[str, set[tuple[str, int]]] = defaultdict(set)  # of it or a submodule: nothing else
    for imp in ctx.extraction.imports():
        if imp.module and not imp.module.startswith("."):
            by_mod[imp.module].add(imp.path)
            own[imp.module].add((imp.path, imp.line))
            parts = imp.module.split(".")
            for k in range(1, len(parts) + 1):
                stmts[".".join(parts[:k])].add((imp.path, imp.line))
    mods = [m for m, files in sorted(by_mod.items()) if 2 <= len(files) <= ctx.limits.max_grep_hits]
    for mod in _shuffled(ctx, "grep_importers", mods):

        def answer(hits: list[tuple[str, int, str]], mod: str = mod) -> str:
            files = sorted({p for p, _, _ in hits})
            items = "\n".join(f"- `{f}`" for f in files)
            return f"Files that import `{mod}`:\n{items}\n\n{_total(len(files), 'file')}"

        esc = re.escape(mod)
        args = {"pattern": rf"^\s*(from {esc} import|import {esc}\b)", "glob": "*.py"}
        path = sorted(by_mod[mod])[0]
        yield _grep_example(ctx, "grep_importers", mod, args, own[mod], answer, (path, 1, 1),
                            only=stmts[mod])


def gen_grep_async(ctx: Ctx) -> Iterator[Example | None]:
    per_file: dict[str, list[Symbol]] = defaultdict(list)
    for s in ctx.extraction.symbols():
        if s.is_async:
            per_file[s.path].append(s)
    for path in _shuffled(ctx, "grep_async", sorted(per_file)):

        def answer(hits: list[tuple[str, int, str]]) -> str:
            names = [(m[1], n) for _, n, t in hits if (m := re.match(r"\s*async def (\w+)", t))]
            items = "\n".join(f"- `{f}` (line {n})" for f, n in names)
            return (f"Async functions in `{hits[0][0]}`:\n{items}\n\n"
                    f"{_total(len(names), 'async function')}")

        args = {"pattern": r"^\s*async def \w+", "path": path}
        expect = {(s.path, s.def_line) for s in per_file[path]}
        lines = [s.start_line for s in per_file[path]] + [s.end_line for s in per_file[path]]
        yield _grep_example(ctx, "grep_async", path, args, expect, answer,
                            (path, min(lines), max(lines)), only=expect)


def _read_trajectory(ctx: Ctx, kind: str, s: Symbol) -> tuple[list[dict], str] | None:
    """grep for the definition, then read_file from the hit's line (the tool's default end is
    the end of the definition, decorators included): every argument is on screen before the
    call. None (counted) when the name is ambiguous or the read disagrees with the parse."""
    if s.end_line - s.start_line + 1 > ctx.limits.max_read_lines:
        ctx.stats["dropped_span_too_long"] += 1
        return None
    gargs = {"pattern": definition_pattern(s.name), "glob": "*.py"}
    got = _grep(ctx, gargs)
    if got is None:
        return None
    gres, hits = got
    if len(hits) != 1 or (hits[0][0], hits[0][1]) != (s.path, s.def_line):
        ctx.stats["dropped_ambiguous_name"] += 1
        return None
    rargs = {"path": hits[0][0], "start_line": hits[0][1]}
    rres = tools.execute(ctx.root, "read_file", rargs)
    shown = [int(ln.split(":", 1)[0]) for ln in rres.splitlines() if ln.split(":", 1)[0].isdigit()]
    if rres.startswith("error:") or not shown or (shown[0], shown[-1]) != (s.start_line, s.end_line):
        ctx.stats["dropped_read_disagrees_with_parse"] += 1
        return None
    msgs = [chat.user(ctx.question(kind, s.qualname, s.path, s.start_line)), chat.tool_call("call_1", "grep", gargs),
            chat.tool_result("call_1", "grep", gres), chat.tool_call("call_2", "read_file", rargs),
            chat.tool_result("call_2", "read_file", rres)]
    return msgs, rres


def code_of(read_result: str) -> list[str]:
    """The source lines of a read_file result, without the `N: ` prefixes."""
    return [ln.split(": ", 1)[1] if ": " in ln else "" for ln in read_result.splitlines()]


def show_answer(s: Symbol, read_result: str) -> str:
    """Answer "show me X": where it starts, and the lines read (their head when long), quoted as
    the tool printed them, numbers and indentation kept.

    Quoted verbatim, every quoted line is the same tokens as its line in the tool result, so
    writing it is copying (v10). Dedented and without the `N: ` prefixes (v9), each line's
    indentation tokenizes differently (merged into the newline token, not after `446: `).
    Measured (README, generator v10): the default chain answered 2 of 16 held-out "show X"
    tasks either way; on long reads the adapter does not stop after QUOTE_LINES lines or
    repeats a line. The scorer compares the code either way (`scoring.answer_facts` strips
    the numbers).

    No end line in the sentence: it sits on the last line of a long tool result, and the v8
    phase-7 adapter, teacher-forced on its phase's "show" answers, predicted it in 1 of 14
    held-out answers (50 of 106 trained on) where it got the start line in 12 of 14 (103 of
    106); a wrong number fails the answer. The quote shows where the definition ends."""
    lines = [ln for ln in read_result.splitlines() if ln.split(":", 1)[0].isdigit()]
    code = "\n".join(lines[:QUOTE_LINES])
    where = f"`{s.qualname}` is in `{s.path}` at line {s.start_line}"
    if len(lines) <= QUOTE_LINES:
        return f"{where}:\n\n```\n{code}\n```"
    return f"{where}. Its first {QUOTE_LINES} lines:\n\n```\n{code}\n```"


def _gen_read(ctx: Ctx, kind: str, want: Callable[[Symbol], bool]) -> Iterator[Example | None]:
    for s in _candidates(ctx, kind, want):
        got = _read_trajectory(ctx, kind, s)
        if got is None:
            yield None
            continue
        msgs, rres = got
        yield ctx.example([*msgs, chat.assistant(show_answer(s, rres))], kind, s.path,
                          s.start_line, s.end_line)


def gen_read_class(ctx: Ctx) -> Iterator[Example | None]:
    return _gen_read(ctx, "read_class", lambda s: s.kind == "class" and _public(s))


def gen_read_function(ctx: Ctx) -> Iterator[Example | None]:
    return _gen_read(ctx, "read_function", lambda s: s.kind == "function" and _public(s))


def gen_read_method(ctx: Ctx) -> Iterator[Example | None]:
    return _gen_read(ctx, "read_method", lambda s: s.kind == "method" and _public(s))


_ROLE = re.compile(r":(?:[\w-]+:)*[\w-]+:`~?([^`]+)`")  # :class:`Foo`, :py:meth:`~a.b`
_LITERAL = re.compile(r"``([^`]+)``")


def clean_doc(doc: str, limit: int = 400) -> str:
    """The first paragraph of a docstring as plain text: Sphinx roles and ``literals`` become
    `code`, whitespace folded, and cut at a sentence end (never mid-sentence) when long."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    para = _ROLE.sub(lambda m: f"`{m[1].split('.')[-1] if m[0].count('~') else m[1]}`", para)
    para = _LITERAL.sub(r"`\1`", para)
    if len(para) <= limit:
        return para
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", para) if m.end() <= limit]
    return para[:ends[-1]] if ends else ""


def _usable_doc(doc: str) -> bool:
    p = clean_doc(doc)
    return 40 <= len(p) and not p.startswith((":", ">>>", "..")) and p.rstrip().endswith((".", "!", "?"))


def gen_explain_symbol(ctx: Ctx) -> Iterator[Example | None]:
    """"What does X do?": look it up (grep, read), then answer from the docstring that was read."""
    want = lambda s: s.kind in {"class", "function", "method"} and _public(s) and _usable_doc(s.docstring)  # noqa: E731
    for s in _candidates(ctx, "explain_symbol", want):
        got = _read_trajectory(ctx, "explain_symbol", s)
        doc = clean_doc(s.docstring)
        if got is None or first_paragraph(s.docstring)[:30] not in " ".join(got[1].split()):
            ctx.stats["dropped_doc_not_read"] += got is not None
            yield None
            continue
        answer = f"`{s.qualname}` (`{s.path}`, line {s.def_line}): {doc}"
        yield ctx.example([*got[0], chat.assistant(answer)], "explain_symbol", s.path,
                          s.start_line, s.end_line)


def first_paragraph(doc: str) -> str:
    para = doc.strip().split("\n\n")[0]
    return " ".join(para.split())


GENERATORS: dict[str, Callable[[Ctx], Iterator[Example | None]]] = {
    "grep_class": gen_grep_class, "grep_function": gen_grep_function,
    "grep_subclasses": gen_grep_subclasses, "grep_decorator": gen_grep_decorator,
    "grep_importers": gen_grep_importers, "grep_async": gen_grep_async,
    "read_class": gen_read_class, "read_function": gen_read_function,
    "read_method": gen_read_method, "explain_symbol": gen_explain_symbol,
}


def _shuffled(ctx: Ctx, kind: str, items: list) -> list:
    items = list(items)
    ctx.rng(kind, "order").shuffle(items)
    return items


def _candidates(ctx: Ctx, kind: str, want: Callable[[Symbol], bool]) -> list[Symbol]:
    syms = sorted((s for s in ctx.extraction.symbols() if want(s)), key=lambda s: (s.path, s.start_line))
    return _shuffled(ctx, kind, syms)


def _take(ctx: Ctx, kinds: tuple[str, ...], quota: int) -> list[Example]:
    """Round-robin over `kinds` until `quota` examples or every generator runs dry."""
    from codeadapt.trajectories import GENERATORS as MULTI_STEP

    gens = {k: {**GENERATORS, **MULTI_STEP}[k](ctx) for k in kinds}
    out: list[Example] = []
    while gens and len(out) < quota:
        for k in list(gens):
            if len(out) >= quota:
                break
            for ex in gens[k]:
                if ex is not None:
                    out.append(ex)
                    break
            else:
                del gens[k]
    if len(out) < quota:
        ctx.stats[f"short_{kinds[0].split('_')[0]}"] += quota - len(out)
    return out


def python_examples(root: Path, extraction: Extraction, quotas: dict[str, int],
                    limits: Limits = Limits(), seed: str = "0") -> tuple[list[Example], dict[str, int]]:
    """Up to `quotas[grep|read|explain]` grounded examples for one checkout, plus stats."""
    ctx = Ctx(Path(root), extraction.source, extraction.commit, extraction, limits, seed, Counter())
    out: list[Example] = []
    with tools.indexed(root):
        for family, kinds in (("grep", GREP_KINDS), ("read", READ_KINDS), ("explain", EXPLAIN_KINDS)):
            out += _take(ctx, kinds, quotas.get(family, 0))
    ctx.stats["examples"] = len(out)
    for ex in out:
        ctx.stats[f"kind_{ex.kind}"] += 1
    return out, dict(ctx.stats)
