"""Tree-sitter extraction of Python symbols, imports and docstrings from a checkout."""

from __future__ import annotations

import codecs
import inspect
import os
import re
import stat
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import tree_sitter_python
from tree_sitter import Language, Node, Parser, Query, QueryCursor

from codeadapt import grepindex
from codeadapt.records import Extraction, FileInfo, Import, Symbol

EXTRACTOR_VERSION = "2"  # part of cache keys: bump whenever extraction output changes
DEFAULT_MAX_FILE_BYTES = 1_000_000
TAGS_QUERY = "python-tags.scm"
SKIP_DIRS = frozenset({".git"})

FILES_SEEN = "files_seen"  # every *.py entry and directory symlink the walk met
FILES_PARSED = "files_parsed"
SYMBOLS = "symbols"
IMPORTS = "imports"
SYNTAX_ERRORS = "syntax_errors"  # parsed files whose tree has ERROR/MISSING nodes
DROPPED_BINARY = "dropped_binary"
DROPPED_NON_UTF8 = "dropped_non_utf8"
DROPPED_OVERSIZE = "dropped_oversize"
DROPPED_SYMLINK = "dropped_symlink"
DROPPED_SPECIAL = "dropped_special"  # not a regular file (FIFO, socket, device, directory)
DROPPED_UNREADABLE = "dropped_unreadable"  # lstat/open/read raised OSError
# A path with a control character (a newline in a file name) would break the one-hit-per-line
# grep results every example shows: such files are neither parsed nor searched.
DROPPED_BAD_NAME = "dropped_bad_name"
STAT_KEYS = (
    FILES_SEEN, FILES_PARSED, SYMBOLS, IMPORTS, SYNTAX_ERRORS, DROPPED_BINARY,
    DROPPED_NON_UTF8, DROPPED_OVERSIZE, DROPPED_SYMLINK, DROPPED_SPECIAL, DROPPED_UNREADABLE,
    DROPPED_BAD_NAME,
)  # fmt: skip

PYTHON = Language(tree_sitter_python.language())
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# Text _one_line would change; most parameter lists don't match and skip the token walk.
_NEEDS_FLATTEN = re.compile(rb"[\n\r\t\f#]|  |[(\[{] | [)\]}]|,[)\]}]")
_CLOSERS = frozenset({")", "]", "}"})
_OPENERS = frozenset({"(", "[", "{"})
# Escapes Python decodes in a non-raw str literal; anything else (e.g. "\d") stays as written.
_ESCAPE = re.compile(
    r"""\\(\n|[\\'"abfnrtv]|[0-7]{1,3}|x[0-9a-fA-F]{2}|N\{[A-Za-z0-9 \-]+\}"""
    r"""|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})"""
)
# Backslash-newline continues the literal, so it decodes to nothing.
_SIMPLE_ESCAPES = {
    "\n": "", "\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b", "f": "\f",
    "n": "\n", "r": "\r", "t": "\t", "v": "\v",
}  # fmt: skip


# --- tree-sitter binding quirks live here and nowhere else -------------------------------


@cache
def load_query(filename: str) -> Query:
    """Compile a query shipped in codeadapt/queries (0.26: `Language.query` is gone)."""
    source = (resources.files("codeadapt") / "queries" / filename).read_text(encoding="utf-8")
    return Query(PYTHON, source)


def captures(query: Query, node: Node) -> dict[str, list[Node]]:
    """Captured nodes by capture name, each list in document order (0.26 returns them unordered)."""
    found = QueryCursor(query).captures(node)
    return {name: sorted(nodes, key=lambda n: n.start_byte) for name, nodes in found.items()}


def parse(data: bytes) -> Node:
    """Parse Python source bytes and return the root node (a new Parser is cheap: ~0.3 µs)."""
    return Parser(PYTHON).parse(data).root_node


def _text(node: Node | None) -> str:
    """A node's source text (bindings hand back bytes)."""
    if node is None or node.text is None:
        return ""
    return node.text.decode("utf-8", errors="replace")


# --- one file -----------------------------------------------------------------------------


def extract_file(data: bytes, path: str) -> FileInfo:
    """Module docstring, imports and symbols of one Python file; never raises on bad syntax."""
    data = data.removeprefix(codecs.BOM_UTF8)  # shifts bytes, not rows; ast ignores it too
    root = parse(data)
    found = captures(load_query(TAGS_QUERY), root)
    defs = found.get("definition.class", []) + found.get("definition.function", [])
    defs.sort(key=lambda n: n.start_byte)
    return FileInfo(
        path=path,
        module_docstring=_docstring(root),
        imports=tuple(_imports(found.get("reference.import", []), path)),
        symbols=tuple(_symbols(defs, path)),
        has_syntax_error=root.has_error,
    )


def _symbols(defs: list[Node], path: str) -> Iterator[Symbol]:
    """Classes, module-level functions and methods; defs inside functions are skipped."""
    # Statements nest by byte range, so a stack of open definitions gives each one its
    # enclosing class (qualname) or function (skip) without walking parents.
    stack: list[tuple[int, str | None]] = []  # (end_byte, qualname; None = inside a function)
    for node in defs:
        while stack and stack[-1][0] <= node.start_byte:
            stack.pop()
        outer = stack[-1][1] if stack else ""
        name = _text(node.child_by_field_name("name"))
        is_class = node.type == "class_definition"
        if outer is None or not name:
            stack.append((node.end_byte, None))
            continue
        qualname = f"{outer}.{name}" if outer else name
        stack.append((node.end_byte, qualname if is_class else None))
        start, decorators = _span(node)
        common: dict[str, Any] = {
            "name": name,
            "qualname": qualname,
            "path": path,
            "start_line": start,
            "end_line": _last_row(node) + 1,
            "def_line": node.start_point.row + 1,
            "docstring": _docstring(node.child_by_field_name("body")),
            "decorators": decorators,
        }
        if is_class:
            yield _class(node, common)
        else:
            yield _function(node, "method" if outer else "function", common)


def _span(node: Node) -> tuple[int, tuple[str, ...]]:
    """First line (1-based, decorators included) and decorator texts without '@'."""
    parent = node.parent
    if parent is None or parent.type != "decorated_definition":
        return node.start_point.row + 1, ()
    decorators = []
    for dec in parent.children:
        if dec.type == "decorator":
            exprs = [c for c in dec.named_children if c.type != "comment"]
            decorators.append(_text(exprs[0]) if exprs else _text(dec)[1:].strip())
    return parent.start_point.row + 1, tuple(decorators)


def _class(node: Node, common: dict[str, Any]) -> Symbol:
    """A class Symbol; bases are positional superclasses only, keywords show in the signature."""
    supers = node.child_by_field_name("superclasses")
    bases: tuple[str, ...] = ()
    if supers is not None:
        skip = {"keyword_argument", "dictionary_splat", "comment"}
        bases = tuple(_text(c) for c in supers.named_children if c.type not in skip)
    type_params = _one_line(node.child_by_field_name("type_parameters"))
    signature = f"class {common['name']}{type_params}{_one_line(supers)}"
    return Symbol(kind="class", signature=signature, bases=bases, **common)


def _function(node: Node, kind: str, common: dict[str, Any]) -> Symbol:
    """A function or method Symbol."""
    params = node.child_by_field_name("parameters")
    parameters: tuple[str, ...] = ()
    if params is not None:
        parameters = tuple(_text(c) for c in params.named_children if c.type != "comment")
    returns = node.child_by_field_name("return_type")
    is_async = node.child_count > 0 and node.children[0].type == "async"
    signature = ("async def " if is_async else "def ") + common["name"]
    signature += _one_line(node.child_by_field_name("type_parameters"))
    signature += _one_line(params) or "()"
    if returns is not None:
        signature += f" -> {_one_line(returns)}"
    return Symbol(
        kind=kind,
        signature=signature,
        is_async=is_async,
        parameters=parameters,
        return_annotation=_text(returns),
        **common,
    )


def _last_row(node: Node) -> int:
    """Row of the last token that is not a comment (ast's end_lineno ignores comments)."""
    while node.child_count:
        kids = [c for c in node.children if c.type != "comment" and c.end_byte > c.start_byte]
        if not kids:
            break
        node = kids[-1]
    return node.end_point.row


def _tokens(node: Node, depth: int = 0) -> Iterator[tuple[Node, int]]:
    """Leaf tokens under node with their depth, strings whole, comments dropped."""
    for child in node.children:
        if child.type == "comment":
            continue
        if child.child_count == 0 or child.type == "string":
            yield child, depth
        else:
            yield from _tokens(child, depth + 1)


def _one_line(node: Node | None) -> str:
    """Node text on one line: each whitespace run becomes one space, none just inside brackets."""
    if node is None:
        return ""
    raw, base = node.text or b"", node.start_byte
    if node.child_count == 0 or node.type == "string" or not _NEEDS_FLATTEN.search(raw):
        return raw.decode("utf-8", errors="replace")
    toks = list(_tokens(node))
    out: list[str] = []
    for i, (tok, depth) in enumerate(toks):
        text = _text(tok)
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if text == "," and depth == 0 and nxt and nxt[1] == 0 and _text(nxt[0]) in _CLOSERS:
            continue  # a trailing comma of the parameter/argument list itself
        if out and i > 0:
            gap = raw[toks[i - 1][0].end_byte - base : tok.start_byte - base]
            if gap and out[-1] not in _OPENERS and text not in _CLOSERS:
                out.append(" ")
        out.append(text)
    return "".join(out)


# --- docstrings ---------------------------------------------------------------------------


def _docstring(body: Node | None) -> str:
    """The cleaned docstring of a module or block, equal to `ast.get_docstring` (or "")."""
    if body is None:
        return ""
    for child in body.named_children:
        if child.type == "comment":
            continue
        if child.type != "expression_statement" or child.named_child_count != 1:
            return ""
        value = _str_literal(child.named_children[0])
        return "" if value is None else inspect.cleandoc(value)
    return ""


def _str_literal(node: Node) -> str | None:
    """Value of a plain str literal (concatenated or parenthesised); None for f/t/bytes/other."""
    if node.type == "parenthesized_expression":
        inner = [c for c in node.named_children if c.type != "comment"]
        return _str_literal(inner[0]) if len(inner) == 1 else None
    if node.type == "concatenated_string":
        parts = [_str_literal(c) for c in node.named_children if c.type != "comment"]
        return None if any(p is None for p in parts) else "".join(parts)  # type: ignore[arg-type]
    if node.type != "string" or node.child_count < 2 or node.children[0].type != "string_start":
        return None
    opening, closing = node.children[0].text or b"", node.children[-1]
    prefix = opening.rstrip(b"'\"").lower()
    if b"f" in prefix or b"b" in prefix or b"t" in prefix:
        return None  # f-strings are JoinedStr and bytes aren't str: no docstring for ast either
    raw = node.text or b""
    end = len(raw) - (len(closing.text or b"") if closing.type == "string_end" else 0)
    body = raw[len(opening) : end].decode("utf-8", errors="replace")
    body = body.replace("\r\n", "\n").replace("\r", "\n")  # the tokenizer does the same
    return body if b"r" in prefix else _ESCAPE.sub(_unescape, body)


def _unescape(match: re.Match[str]) -> str:
    """Decode one backslash escape the way the Python tokenizer does (without its warnings)."""
    escape = match.group(1)
    head = escape[0]
    try:
        if head in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[head]
        if head in "xuU":
            return chr(int(escape[1:], 16))
        if head == "N":
            return unicodedata.lookup(escape[2:-1])
        return chr(int(escape, 8))
    except (KeyError, ValueError):  # unknown name, > U+10FFFF: SyntaxErrors; keep the text
        return match.group(0)


# --- imports ------------------------------------------------------------------------------


def _dotted(node: Node | None) -> str:
    """A (possibly relative) dotted module name with whitespace removed, as ast spells it."""
    return "".join(_text(node).split())


def _alias(node: Node) -> str:
    """`name` or `name as alias` for one imported name."""
    if node.type != "aliased_import":
        return _dotted(node)
    name = _dotted(node.child_by_field_name("name"))
    return f"{name} as {_text(node.child_by_field_name('alias'))}"


def _imports(nodes: Iterable[Node], path: str) -> Iterator[Import]:
    """One Import per module of `import a, b`; one per `from m import x, y` statement."""
    for node in nodes:
        line = node.start_point.row + 1
        names = node.children_by_field_name("name")
        if node.type == "import_statement":
            for name in names:
                if name.type == "aliased_import":
                    module = _dotted(name.child_by_field_name("name"))
                    yield Import(path, line, module, (_alias(name),))
                else:
                    yield Import(path, line, _dotted(name))
            continue
        if node.type == "future_import_statement":
            module = "__future__"
        else:
            module = _dotted(node.child_by_field_name("module_name"))
        imported = [_alias(n) for n in names]
        if any(c.type == "wildcard_import" for c in node.children):
            imported.append("*")
        yield Import(path, line, module, tuple(imported))


# --- a whole checkout ---------------------------------------------------------------------


def python_files(root: Path) -> Iterator[Path]:
    """`*.py` entries and directory symlinks (yielded to be counted, never entered), sorted."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        entered = []
        for name in dirnames:
            if name in SKIP_DIRS:
                continue
            if (base / name).is_symlink():
                found.append(base / name)
            else:
                entered.append(name)
        dirnames[:] = entered
        found += [base / name for name in filenames if name.endswith(".py")]
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return iter(found)


def _read(path: Path, max_file_bytes: int) -> tuple[bytes, str]:
    """The file's bytes and "", or b"" and the drop reason; symlinks are never opened."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return b"", DROPPED_SYMLINK
        if not stat.S_ISREG(st.st_mode):
            return b"", DROPPED_SPECIAL
        if st.st_size > max_file_bytes:
            return b"", DROPPED_OVERSIZE
        # O_NOFOLLOW: a file swapped for a symlink after lstat still isn't followed.
        with os.fdopen(os.open(path, os.O_RDONLY | _O_NOFOLLOW), "rb") as f:
            data = f.read(max_file_bytes + 1)
    except OSError:
        return b"", DROPPED_UNREADABLE
    if len(data) > max_file_bytes:
        return b"", DROPPED_OVERSIZE
    if b"\0" in data:
        return b"", DROPPED_BINARY
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return b"", DROPPED_NON_UTF8
    return data, ""


CHUNK_BYTES = 2_000_000  # a parse task's share of a big checkout: spreads it over processes


def extract_checkout(
    root: Path, source: str, commit: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    starmap: Callable[..., list[Any]] | None = None,
) -> Extraction:
    """Extract every `*.py` file under root; skipped files are counted in stats by reason.
    `starmap` (e.g. `parallel.starmap`) runs the chunks of files, each about CHUNK_BYTES, in
    other processes; the result is the same as in order here."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"checkout root {str(root)!r} is not a directory")
    if max_file_bytes <= 0:
        raise ValueError(f"max_file_bytes must be positive, got {max_file_bytes}")
    chunks: list[list[str]] = [[]]
    size = 0
    for path in python_files(root):
        if size >= CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(path.relative_to(root).as_posix())
        try:
            size += os.lstat(path).st_size
        except OSError:
            pass
    run = starmap or (lambda fn, arglists: [fn(*a) for a in arglists])
    stats = dict.fromkeys(STAT_KEYS, 0)
    files: list[FileInfo] = []
    for part in run(extract_files, [(str(root), chunk, max_file_bytes) for chunk in chunks]):
        for dropped, info in part:
            stats[FILES_SEEN] += 1
            if dropped:
                stats[dropped] += 1
                continue
            stats[FILES_PARSED] += 1
            stats[SYNTAX_ERRORS] += info.has_syntax_error
            stats[SYMBOLS] += len(info.symbols)
            stats[IMPORTS] += len(info.imports)
            files.append(info)
    return Extraction(source=source, commit=commit, files=tuple(files), stats=stats)


def extract_files(root: str, rels: list[str], max_file_bytes: int) -> list[tuple[str, FileInfo | None]]:
    """(drop reason or "", parse) of each file in `rels`, relative to `root`."""
    out: list[tuple[str, FileInfo | None]] = []
    for rel in rels:
        if grepindex.BAD_NAME.search(rel):
            out.append((DROPPED_BAD_NAME, None))
            continue
        data, dropped = _read(Path(root, rel), max_file_bytes)
        out.append((dropped, None) if dropped else ("", extract_file(data, rel)))
    return out


# --- on-disk cache format -----------------------------------------------------------------


def _record_to_json(record: Symbol | Import) -> dict[str, Any]:
    """A flat record as a dict, tuples as lists."""
    out: dict[str, Any] = {}
    for f in fields(record):
        value = getattr(record, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _record_from_json(cls: type[Symbol | Import], d: dict[str, Any]) -> Any:
    """Inverse of _record_to_json."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def extraction_to_json(e: Extraction) -> dict[str, Any]:
    """A JSON-serialisable dict; `extraction_from_json` restores an equal Extraction."""
    return {
        "extractor_version": EXTRACTOR_VERSION,
        "source": e.source,
        "commit": e.commit,
        "stats": dict(e.stats),
        "files": [
            {
                "path": f.path,
                "module_docstring": f.module_docstring,
                "has_syntax_error": f.has_syntax_error,
                "imports": [_record_to_json(i) for i in f.imports],
                "symbols": [_record_to_json(s) for s in f.symbols],
            }
            for f in e.files
        ],
    }


def extraction_from_json(d: dict[str, Any]) -> Extraction:
    """Rebuild an Extraction; refuses data written by another EXTRACTOR_VERSION."""
    version = d.get("extractor_version")
    if version != EXTRACTOR_VERSION:
        raise ValueError(
            f"extraction has extractor_version {version!r}, expected {EXTRACTOR_VERSION!r}"
        )
    files = tuple(
        FileInfo(
            path=f["path"],
            module_docstring=f["module_docstring"],
            imports=tuple(_record_from_json(Import, i) for i in f["imports"]),
            symbols=tuple(_record_from_json(Symbol, s) for s in f["symbols"]),
            has_syntax_error=f["has_syntax_error"],
        )
        for f in d["files"]
    )
    return Extraction(source=d["source"], commit=d["commit"], files=files, stats=dict(d["stats"]))
