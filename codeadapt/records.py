"""Typed records passed between pipeline stages (sources → symbols → examples → datasets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Checkout:
    """A source checked out at a pinned commit; everything downstream reads only this."""

    name: str
    kind: str  # "git" | "installed" | "path"
    origin: str  # URL, distribution name + version, or directory
    ref: str
    commit: str
    path: str  # absolute path of the work tree
    group: str
    generator: str  # "python" | "html"


@dataclass(frozen=True, slots=True)
class SyncFailure:
    """A source that could not be synced; the other sources go on."""

    name: str
    origin: str
    error: str


@dataclass(frozen=True, slots=True)
class Symbol:
    """One definition found by tree-sitter (a class, function or method)."""

    kind: str  # "class" | "function" | "method"
    name: str
    qualname: str
    path: str  # relative to the checkout, POSIX separators
    start_line: int  # 1-based, inclusive; includes decorators
    end_line: int
    def_line: int  # line of the `class`/`def` keyword
    signature: str = ""
    docstring: str = ""
    decorators: tuple[str, ...] = ()
    bases: tuple[str, ...] = ()
    is_async: bool = False
    parameters: tuple[str, ...] = ()
    return_annotation: str = ""


@dataclass(frozen=True, slots=True)
class Import:
    """`import x` or `from x import y`, as written in one file."""

    path: str
    line: int
    module: str
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FileInfo:
    """What extraction found in one Python file."""

    path: str
    module_docstring: str = ""
    imports: tuple[Import, ...] = ()
    symbols: tuple[Symbol, ...] = ()
    has_syntax_error: bool = False


@dataclass(frozen=True, slots=True)
class Extraction:
    """All files of one checkout, plus counted skips."""

    source: str
    commit: str
    files: tuple[FileInfo, ...]
    stats: dict[str, int] = field(default_factory=dict)

    def symbols(self) -> list[Symbol]:
        return [s for f in self.files for s in f.symbols]

    def imports(self) -> list[Import]:
        return [i for f in self.files for i in f.imports]


@dataclass(frozen=True, slots=True)
class Example:
    """One chat example with its provenance."""

    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...]
    source: str
    commit: str
    path: str
    start_line: int
    end_line: int
    kind: str  # grep_class, read_function, direct_docstring, html_..., handwritten_...
    generator_version: str

    def record(self) -> dict[str, Any]:
        """The JSONL line mlx-lm trains on."""
        return {"messages": list(self.messages), "tools": list(self.tools)}
