"""The assistant's tools. The same code writes tool results into examples and runs the
model's tool calls in evaluation, so a training example can never show output the tool
would not give."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# `regex` (re-compatible syntax) because its searches take a timeout: a model's pattern can
# backtrack catastrophically, and evaluation runs the model's calls.
import regex as re

from codeadapt import grepindex

MAX_GREP_MATCHES = 50
MAX_LINE_CHARS = 200
MAX_READ_LINES = 200
MAX_FILE_BYTES = 1_000_000
GREP_TIMEOUT_S = 5.0
NO_MATCHES = "No matches."  # grep's whole result when nothing matches

# Short descriptions on purpose: the schemas are in every prompt, and on a small model every
# prompt token costs training and evaluation time.
TOOL_SCHEMAS: tuple[dict[str, Any], ...] = (
    {
        "type": "function",
        "function": {
            "name": "grep",
            "description": "Regex search in the repository; prints path:line:text per match.",
            "parameters": {
                "type": "object",
                "properties": {
                    "pattern": {"type": "string", "description": "Python regex"},
                    "path": {"type": "string", "description": "file or directory; default: all"},
                    "glob": {"type": "string", "description": "file name filter, e.g. *.py"},
                },
                "required": ["pattern"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Print numbered lines of a file.",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "relative path"},
                    "start_line": {"type": "integer",
                                   "description": "1-based; alone: the whole def/class holding it"},
                    "end_line": {"type": "integer", "description": "last line, inclusive"},
                },
                "required": ["path"],
            },
        },
    },
)
TOOL_NAMES = frozenset(t["function"]["name"] for t in TOOL_SCHEMAS)


class ToolError(ValueError):
    """A tool call the tool refuses (bad path, bad pattern); its text is the tool result."""


def _resolve(root: Path, rel: str) -> Path:
    """Resolve `rel` inside `root`; refuse anything that leaves it, symlinks included."""
    if not isinstance(rel, str):
        raise ToolError(f"path must be a string, got {type(rel).__name__}")
    if "\0" in rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise ToolError(f"path {rel!r} is outside the repository")
    root = root.resolve()
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise ToolError(f"path {rel!r} is outside the repository")
    return target


def _text_lines(file: Path) -> list[str] | None:
    """The file's lines, or None for what a code search skips: binary, non-UTF-8, huge."""
    try:
        st = file.stat()
    except OSError:
        return None
    if st.st_size > MAX_FILE_BYTES:
        return None
    return _decoded(str(file), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8192)
def _decoded(file: str, mtime_ns: int, size: int) -> list[str] | None:
    """Cached on (path, mtime, size): read_file is called on the same files often."""
    try:
        return grepindex.decode(Path(file).read_bytes())
    except OSError:
        return None


class _Lazy:
    """A checkout's index, built by the first grep that needs it."""

    def __init__(self, root: Path) -> None:
        self.root, self._index = root, None
        self.results: dict[tuple[Any, ...], str | ToolError] = {}  # grep is a function of the tree

    def get(self) -> grepindex.TreeIndex:
        if self._index is None:
            self._index = grepindex.TreeIndex(self.root, MAX_FILE_BYTES)
        return self._index


_INDEX: contextvars.ContextVar[_Lazy | None] = contextvars.ContextVar("grep_index", default=None)


@contextlib.contextmanager
def indexed(root: str | os.PathLike[str]) -> Iterator[None]:
    """Greps under `root` inside this block read its files from one index, built by the first
    of them (the tree must not change inside the block): example generation and replay run
    hundreds of greps over one pinned checkout."""
    token = _INDEX.set(_Lazy(Path(root).resolve()))
    try:
        yield
    finally:
        _INDEX.reset(token)


def _tree(root: Path, start: Path) -> tuple[grepindex.TreeIndex, tuple[int, int]]:
    """The index grep searches for `start` (a file or a directory), and its range of files."""
    if start.is_file():
        one = grepindex.TreeIndex(root, MAX_FILE_BYTES, [start])
        return one, (0, len(one.rels))
    index = _INDEX.get()
    tree = (index.get() if index is not None and index.root == root
            else grepindex.TreeIndex(root, MAX_FILE_BYTES, grepindex.walk(start)))
    return tree, tree.under(start)


MAX_PATTERN_CHARS = 1000
MAX_EXPANSION = 10_000  # the most a pattern's counted repeats may multiply out to


def expansion(pattern: str) -> int:
    """How far the nested counted repeats of `pattern` multiply out (`(?:a{100}){100}` is
    10,000). The `regex` module expands them at compile time, outside any timeout, so
    `(?:(?:a{200}){200}){200}` would take gigabytes before a search starts."""
    depth_product = [1]
    worst = 1
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            depth_product.append(1)
        elif c == ")":
            inner = depth_product.pop() if len(depth_product) > 1 else 1
            m = re.match(r"\{(\d*)(?:,(\d*))?\}", pattern[i + 1:])
            count = max(int(m[1] or 0), int(m[2] or 0)) if m else 1
            depth_product[-1] = max(depth_product[-1], inner * max(count, 1))
        elif c == "{":
            m = re.match(r"\{(\d*)(?:,(\d*))?\}", pattern[i:])
            if m:
                depth_product[-1] = max(depth_product[-1], max(int(m[1] or 0), int(m[2] or 0), 1))
        worst = max(worst, *depth_product)
        i += 1
    return max(worst, *depth_product)


def grep(root: str | os.PathLike[str], pattern: str, path: str = ".", glob: str | None = None) -> str:
    """Lines matching `pattern` under `path`, as `path:line:text`."""
    root_p = Path(root).resolve()
    index = _INDEX.get()
    if index is None or index.root != root_p:
        return _grep(root_p, pattern, path, glob)
    key = (type(pattern), pattern, type(path), path, type(glob), glob)
    try:
        hit = index.results.get(key)
    except TypeError:  # an unhashable argument: the call itself will say what is wrong
        hit = None
    if hit is None:
        try:
            hit = _grep(root_p, pattern, path, glob)
        except ToolError as exc:
            hit = exc
        if len(index.results) < 100_000:
            with contextlib.suppress(TypeError):
                index.results[key] = hit
    if isinstance(hit, ToolError):
        raise hit
    return hit


def _grep(root_p: Path, pattern: str, path: str, glob: str | None) -> str:
    if not isinstance(pattern, str):
        raise ToolError(f"pattern must be a string, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ToolError(f"pattern is longer than {MAX_PATTERN_CHARS} characters")
    if expansion(pattern) > MAX_EXPANSION:
        raise ToolError(f"pattern {pattern!r} repeats more than {MAX_EXPANSION:,} times when expanded")
    try:
        regex = re.compile(pattern)
    except (re.error, TypeError, OverflowError, ValueError) as exc:
        raise ToolError(f"invalid pattern {pattern!r}: {exc}") from None
    deadline = time.monotonic() + GREP_TIMEOUT_S
    start = _resolve(root_p, path or ".")
    if not start.exists():
        raise ToolError(f"no such file or directory: {path}")
    if start.is_symlink():
        raise ToolError(f"path {path!r} is a symlink")
    hits: list[str] = []
    total = 0
    try:
        tree, files = _tree(root_p, start)
        for rel, n, line in tree.grep(regex, pattern, files, glob, deadline):
            total += 1
            if len(hits) < MAX_GREP_MATCHES:
                hits.append(f"{rel}:{n}:{line[:MAX_LINE_CHARS]}")
    except TimeoutError:
        raise ToolError(f"pattern {pattern!r} took longer than {GREP_TIMEOUT_S:g} s") from None
    if not hits:
        return NO_MATCHES
    if total > len(hits):
        hits.append(f"... {total - len(hits)} more matches not shown")
    return "\n".join(hits)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _continues(line: str, base: int) -> bool:
    """Is `line` still inside a statement that starts at indentation `base`? Blank lines, deeper
    lines and closing brackets at the same depth (a black-style `) -> T:`) are."""
    s = line.strip()
    return not s or _indent(line) > base or s[0] in ")]}"


DEF_HEADS = ("def ", "async def ", "class ")


def _is_decorator(line: str, base: int) -> bool:
    return line.lstrip().startswith("@") and _indent(line) == base


def block_span(lines: list[str], start: int, upto: int | None = None) -> tuple[int, int]:
    """The lines (1-based, inclusive) of the statement that begins at line `start` with its
    indented body; for a `def`/`class` or a decorator, the whole definition, decorators
    included. Indentation only, no parse, so a file that does not parse still reads. With
    `upto` (a bounded containment check), the body is followed no further than that line and
    decorators above are not looked for."""
    base = _indent(lines[start - 1])
    head = lines[start - 1].lstrip()
    first = n = start
    if head.startswith(DEF_HEADS) or head.startswith("@"):
        k = start - 1 if upto is None else 0  # climb over decorators (and their wrapped arguments) above
        while k >= 1 and lines[k - 1].strip() and (_is_decorator(lines[k - 1], base)
                                                    or _continues(lines[k - 1], base)):
            first = k if _is_decorator(lines[k - 1], base) else first
            k -= 1
        while n <= len(lines) and (_is_decorator(lines[n - 1], base)
                                   or n > start and _continues(lines[n - 1], base)):
            n += 1  # down to the definition line itself
        n = min(n, len(lines))
    end = n
    in_string = _open_string(lines[n - 1], None)
    n += 1
    while n <= min(len(lines), upto or len(lines)) and (in_string is not None
                                                        or _continues(lines[n - 1], base)):
        end = n if lines[n - 1].strip() else end
        in_string = _open_string(lines[n - 1], in_string)
        n += 1
    return first, end


def enclosing_span(lines: list[str], line: int, reach: int = MAX_READ_LINES) -> tuple[int, int] | None:
    """The innermost `def`/`class` (decorators included) whose body holds the non-blank `line`,
    as `block_span` gives it, when its first line is less than `reach` lines above (so a read of it
    shows `line`); None when there is none. Heads are tried upward from `line`; a head that does
    not hold it rules out every deeper one above it, so at most one head per indentation level
    is followed, each no further than `line`: bounded work on any file."""
    limit: int | None = None
    for k in range(line - 1, max(0, line - reach), -1):
        head = lines[k - 1]
        if not head.lstrip().startswith(DEF_HEADS) or (limit is not None and _indent(head) >= limit):
            continue
        if block_span(lines, k, upto=line)[1] >= line:
            first, end = block_span(lines, k)
            return (first, end) if line - first < reach else None
        limit = _indent(head)
    return None


def _open_string(line: str, inside: str | None) -> str | None:
    """The triple quote left open after `line` (a docstring's text may sit at any
    indentation), given the one open before it; None when none is."""
    i = 0
    while True:
        if inside is None:
            hits = [(line.find(q, i), q) for q in ('"""', "'''") if line.find(q, i) >= 0]
            if not hits:
                return None
            i, inside = min(hits)
        else:
            j = line.find(inside, i)
            if j < 0:
                return inside
            i, inside = j, None
        i += 3


def _span_at(lines: list[str], line: int, path: str) -> tuple[int, int]:
    """What `read_file` shows for a `start_line` alone (see there)."""
    head = lines[line - 1].lstrip()
    if path.endswith((".py", ".pyi")) and head and not head.startswith((*DEF_HEADS, "@")):
        found = enclosing_span(lines, line)
        if found is not None:
            return found
    return block_span(lines, line)


def read_file(
    root: str | os.PathLike[str], path: str, start_line: int | None = None,
    end_line: int | None = None
) -> str:
    """Lines `start_line..end_line` of `path`, each as `N: text`, at most MAX_READ_LINES.

    Defaults: no `start_line` and no `end_line` reads the file from the top; a `start_line`
    alone reads the definition there (`block_span`: a `def` with its decorators and body) or,
    in a Python file, the innermost definition that holds that line (`enclosing_span`: a hit
    in a docstring or body), else the block that starts there. So a grep hit's line number is
    all a caller needs to read the whole function the hit is in."""
    whole = start_line is None
    start_line = 1 if start_line is None else start_line
    root_p = Path(root).resolve()
    file = _resolve(root_p, path)
    if (root_p / path).is_symlink():
        raise ToolError(f"path {path!r} is a symlink")
    if not file.is_file():
        raise ToolError(f"no such file: {path}")
    lines = _text_lines(file)
    if lines is None:
        raise ToolError(f"{path} is binary, not UTF-8, or too large to read")
    if isinstance(start_line, bool) or not isinstance(start_line, int) or start_line < 1:
        raise ToolError(f"start_line must be a positive integer, got {start_line!r}")
    if start_line > len(lines):
        raise ToolError(f"{path} has only {len(lines)} lines")
    first, last = start_line, end_line
    if end_line is None:
        first, last = (1, len(lines)) if whole else _span_at(lines, start_line, path)
    if isinstance(last, bool) or not isinstance(last, int) or last < start_line:
        raise ToolError(f"end_line must be an integer >= start_line, got {end_line!r}")
    last = min(last, len(lines), first + MAX_READ_LINES - 1)
    return "\n".join(f"{n}: {lines[n - 1]}" for n in range(first, last + 1))


_SPECIAL = re.compile(r"<\|([A-Za-z0-9_]+)\|>")


def escape_specials(text: str) -> str:
    """Repository text never carries a control token: `<|im_start|>` becomes `<\u200c|im_start|>`
    (a zero-width non-joiner after the `<`), which reads the same and tokenizes as plain text.
    Applied to every tool result and to every message built from repository text."""
    return _SPECIAL.sub(lambda m: f"<\u200c|{m[1]}|>", text)


def execute(root: str | os.PathLike[str], name: str, arguments: dict[str, Any] | str) -> str:
    """Run one tool call as the model wrote it; refusals come back as `error: ...` text.
    Results have control-token look-alikes escaped (`escape_specials`)."""
    return escape_specials(_execute(root, name, arguments))


def _execute(root: str | os.PathLike[str], name: str, arguments: dict[str, Any] | str) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            return f"error: arguments are not valid JSON: {exc}"
    if not isinstance(arguments, dict):
        return "error: arguments must be a JSON object"
    try:
        if name == "grep":
            allowed = {"pattern", "path", "glob"}
            fn = grep
        elif name == "read_file":
            allowed = {"path", "start_line", "end_line"}
            fn = read_file
        else:
            return f"error: unknown tool {name!r}"
        extra = set(arguments) - allowed
        if extra:
            return f"error: unexpected arguments {sorted(extra)} for {name}"
        return fn(root, **arguments)
    except ToolError as exc:
        return f"error: {exc}"
    except TypeError as exc:
        return f"error: {exc}"
    except (OSError, RuntimeError, RecursionError, MemoryError, OverflowError, ValueError) as exc:
        # A name over 255 bytes, a symlink loop, a pattern too big to hold: the model's call
        # failed, the evaluation goes on.
        return f"error: {type(exc).__name__}: {str(exc)[:200]}"
