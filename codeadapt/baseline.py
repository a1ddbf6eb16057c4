"""A rule baseline: what a few regular expressions over the visible conversation do on the same
prompts and scorer as the models. It reads only what a model sees (the question, earlier calls
and tool results), never the expected turn or the example's kind.

Rules, first turn: a backticked name (else the last identifier-like word) and the question's
keywords pick a search — subclasses, decorator uses, importers, async functions, an HTML
check by its keyword, else "where is X defined". A question that names no identifier (it
describes behaviour) greps its longest pair of adjacent plain words. After a grep: a "show /
explain" or a described question reads the first hit from its line (read_file shows the
definition that holds it); otherwise the answer restates the hits (with the name each
`class`/`def` hit defines). After a read: the answer quotes the code read ("show"), its
docstring's first line ("explain"), or the definition above the hit (described). A follow-up with no name after a read answers from that read: the parameters in
the `def` line, or the `@` lines above it.
"""

from __future__ import annotations

import json
import re
import textwrap
from typing import Any

from codeadapt.examples import QUOTE_LINES, code_of, definition_pattern, parse_hits
from codeadapt.trajectories import enclosing_definition

SHOW = re.compile(r"\b(show|source|implement\w*|code|read|look like|open|print|body)\b", re.I)
EXPLAIN = re.compile(r"\b(what does|what is|what's|purpose|used for|explain|summari[sz]e|tell me)\b", re.I)
HTML_CHECKS: tuple[tuple[str, str], ...] = (  # question keyword -> the grep an HTML check uses
    (r"\balt\b|image", r"(?i)<img\b"),
    (r"tabindex|tab order", r"(?i)tabindex"),
    (r"heading", r"(?i)<h[1-6]\b"),
    (r"\blang|language", r"(?i)<html\b"),
    (r"landmark|region", r'(?i)<(header|nav|main|aside|footer)\b'
                         r'|\brole="(banner|navigation|main|complementary|contentinfo|search)"'),
    (r"link", r"(?i)<a\b"),
    (r"button", r"(?i)<button\b"),
    (r"field|input|form", r"(?i)<(input|select|textarea)\b"),
)
_HTML_PATH = re.compile(r"[\w./-]+\.html?\b")


def _call(name: str, arguments: dict[str, Any]) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def _name(question: str) -> str:
    ticks = re.findall(r"`([^`]+)`", question)
    if ticks:
        return re.sub(r"^(class|async def|def)\s+", "", ticks[0].strip())
    words = re.findall(r"[A-Za-z_][\w.]*", question)
    return words[-1] if words else question.strip()


_STOP = frozenset("the and for with from into that this which what where does code part find "
                  "function definition something there".split())
_CODE_WORD = re.compile(r"`|\w+\(\)|\b[a-z]+_\w+|\b[a-z]+[A-Z]\w*|\b[A-Z][a-z]+[A-Z]\w*|\w\.\w")


def described(question: str, repo: str = "") -> str | None:
    """For a question of 7 words or more that names no identifier: its longest pair of
    adjacent plain words (not the repository's name)."""
    if _CODE_WORD.search(question) or _HTML_PATH.search(question) or len(question.split()) < 7:
        return None
    words = re.findall(r"[A-Za-z]+|\S", question)
    stop = _STOP | {repo.lower()}
    pairs = [f"{a} {b}" for a, b in zip(words, words[1:]) if a.isalpha() and b.isalpha()
             and a.lower() not in stop and b.lower() not in stop and len(a) > 2 and len(b) > 2]
    return max(pairs, key=len) if pairs else None


def first_turn(question: str, repo: str = "") -> str:
    """The search a rule picks for a question."""
    phrase = described(question, repo)
    if phrase:
        return _call("grep", {"pattern": phrase, "glob": "*.py"})
    html = _HTML_PATH.search(question)
    if html:
        for keyword, pattern in HTML_CHECKS:
            if re.search(keyword, question, re.I):
                return _call("grep", {"pattern": pattern, "path": html[0]})
        return _call("read_file", {"path": html[0]})
    name = _name(question).lstrip("@").removesuffix("()")
    if re.search(r"subclass|inherit|derive|extend|base class", question, re.I):
        return _call("grep", {"pattern": rf"^\s*class \w+\(.*\b{name.split('.')[-1]}\b", "glob": "*.py"})
    if "@" in question or re.search(r"decorat", question, re.I):
        return _call("grep", {"pattern": rf"^\s*@{re.escape(name)}\b", "glob": "*.py"})
    if re.search(r"\bimport", question, re.I):
        esc = re.escape(name)
        return _call("grep", {"pattern": rf"^\s*(from {esc} import|import {esc}\b)", "glob": "*.py"})
    if re.search(r"async|coroutine", question, re.I):
        return _call("grep", {"pattern": r"^\s*async def \w+", "path": name})
    return _call("grep", {"pattern": definition_pattern(name.split(".")[-1]), "glob": "*.py"})


def after_grep(question: str, result: str) -> str:
    hits = parse_hits(result)
    if hits and described(question):
        return _call("read_file", {"path": hits[0][0], "start_line": hits[0][1]})
    if hits and (SHOW.search(question) or EXPLAIN.search(question)) and not _HTML_PATH.search(question):
        return _call("read_file", {"path": hits[0][0], "start_line": hits[0][1]})
    if not hits:
        return "Nothing in the repository matches."
    if len(hits) == 1:
        return f"`{_defined(hits[0][2]) or _name(question)}` is in `{hits[0][0]}` at line {hits[0][1]}."
    return f"{len(hits)} matches:\n" + "\n".join(
        f"- `{name}` (`{p}`, line {n})" if (name := _defined(text)) else f"- `{p}`, line {n}"
        for p, n, text in hits)


def _defined(line: str) -> str | None:
    """The name a `class` / `def` line defines (a subclass search lists the subclasses, not
    the base the question names)."""
    m = re.match(r"\s*(?:class|def|async\s+def)\s+(\w+)", line)
    return m[1] if m else None


def followup(question: str, result: str) -> str:
    """A follow-up answered from the last read: parameters or decorators."""
    code = "\n".join(code_of(result))
    m = re.search(r"(?:def|class)\s+(\w+)", code)
    name = m[1] if m else "it"
    if re.search(r"decorat", question, re.I):
        decs = [ln.strip() for ln in code[: m.start() if m else 0].splitlines() if ln.strip().startswith("@")]
        return (f"Yes: `{name}` is decorated with " + ", ".join(f"`{d}`" for d in decs) + "."
                if decs else f"No, `{name}` has no decorators.")
    sig = re.search(r"def\s+\w+\s*\((.*?)\)\s*(?:->[^:]*)?:", code, re.S)
    params = [" ".join(p.split()) for p in re.split(r",(?![^\[(]*[\])])", sig[1]) if p.strip()] if sig else []
    params = [p for p in params if p not in ("*", "/")]
    if not params:
        return f"`{name}` takes no parameters."
    return f"`{name}` takes {len(params)} parameters: " + ", ".join(f"`{p}`" for p in params) + "."


def after_read(question: str, result: str, args: dict[str, Any]) -> str:
    lines = code_of(result)
    if described(question) and isinstance(args.get("start_line"), int):
        found = enclosing_definition(result, args["start_line"])
        if found:
            return f"The function `{found[0]}` in `{args.get('path')}`, line {found[1]}."
    nums = [int(m[1]) for m in re.finditer(r"(?m)^(\d+): ", result)]
    where = f"`{_name(question)}` is in `{args.get('path')}`, lines {nums[0]}–{nums[-1]}" if nums else ""
    if EXPLAIN.search(question) and not SHOW.search(question):
        doc = re.search(r'"""(.*?)(?:"""|\n\s*\n)', "\n".join(lines), re.S)
        text = " ".join(doc[1].split()) if doc else ""
        return f"{where}: {text}" if text else where + "."
    code = textwrap.dedent("\n".join(lines[:QUOTE_LINES])).rstrip()
    return f"{where}:\n\n```python\n{code}\n```"


def rule_output(messages: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> str:
    """The rule baseline's completion for a prompt's messages (the model's view)."""
    question = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    last = messages[-1]
    reads = [m for m in messages if m.get("role") == "tool" and m.get("name") == "read_file"]
    if last.get("role") == "user" and reads and not _CODE_WORD.search(question):
        return followup(question, reads[-1].get("content", ""))
    if last.get("role") != "tool":
        system = messages[0].get("content", "") if messages else ""
        repo = re.search(r"in the (\S+) repository", system)
        return first_turn(question, repo[1] if repo else "")
    call = next(m for m in reversed(messages) if m.get("tool_calls"))["tool_calls"][0]["function"]
    args = call.get("arguments")
    args = json.loads(args) if isinstance(args, str) else args
    if last.get("content", "").startswith("error:"):
        return "The tool refused the call: " + last["content"]
    if call["name"] == "grep":
        return after_grep(question, last.get("content", ""))
    return after_read(question, last.get("content", ""), args or {})
