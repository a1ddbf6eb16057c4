"""Grep's engine: the text files of one checkout, read once, and a line search that scans a
file's whole text with one regex instead of one call per line.

Example generation runs hundreds of greps over the same pinned checkout, and the dataset build
replays them all; without an index each grep walks the tree, stats and decodes every file
again, and runs the pattern line by line, so an example's cost grows with its repository
(transformers: ~2 s a grep). `TreeIndex` holds each text file's lines joined by "\\n", built
once per checkout (`tools.indexed`), and `matching_lines` finds the lines a pattern matches
with a few C-level scans. Results are the same as a per-line search, line for line (tested
against one on fuzzed patterns)."""

from __future__ import annotations

import bisect
import fnmatch
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import regex as re


@dataclass(frozen=True, slots=True)
class TextFile:
    rel: str        # posix path relative to the root
    name: str       # file name, for glob filters
    text: str       # the file's lines joined by "\n" (what `str.splitlines` gives)
    has_lines: bool  # False for an empty file, whose `text` is "" like a file of one blank line


def decode(data: bytes) -> list[str] | None:
    """The lines of a file, or None for what a code search skips: binary or non-UTF-8."""
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return None


def walk(start: Path) -> Iterator[Path]:
    """Regular files under `start`, never through a symlink, `.git` skipped (unsorted)."""
    for dirpath, dirnames, filenames in os.walk(start, followlinks=False):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            p = Path(dirpath, name)
            if not p.is_symlink() and p.is_file():
                yield p


def read_text_file(file: Path, rel: str, max_bytes: int) -> TextFile | None:
    try:
        if file.stat().st_size > max_bytes:
            return None
        lines = decode(file.read_bytes())
    except OSError:
        return None
    if lines is None:
        return None
    return TextFile(rel, file.name, "\n".join(lines), bool(lines))


class TreeIndex:
    """Every text file under `root` (as grep would read it), sorted by relative path."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        files = []
        for p in walk(root):
            tf = read_text_file(p, p.relative_to(root).as_posix(), max_bytes)
            if tf is not None:
                files.append(tf)
        files.sort(key=lambda f: f.rel)
        self.files = files
        self._rels = [f.rel for f in files]
        self.bytes = sum(len(f.text) for f in files)

    def under(self, start: Path) -> list[TextFile]:
        """The files below directory `start` (inside the root), in path order."""
        rel = start.relative_to(self.root).as_posix()
        if rel == ".":
            return self.files
        prefix = rel + "/"
        lo = bisect.bisect_left(self._rels, prefix)
        hi = bisect.bisect_left(self._rels, prefix + "\U0010ffff")
        return self.files[lo:hi]


def select(files: list[TextFile], glob: str | None) -> list[TextFile]:
    return [f for f in files if fnmatch.fnmatch(f.name, glob)] if glob else files


# What a whole-text scan may take: a pattern matches a line on its own exactly when, scanned
# over the joined text from that line's start, it matches starting inside that line. That holds
# for anything a backtracking search explores fully, with `^`/`$` as line anchors; it fails for
# constructs that prune or look past the line (lookaround, atomic groups, possessive
# quantifiers, string anchors, `\G`, inline flags such as `(?s)` or `(?-m)`, fuzzy matching,
# conditionals, recursion). Those patterns are searched line by line instead.
_INLINE_OK = re.compile(r"\(\?(?::|P<\w+>|P=\w+\)|#[^)]*\)|[aiLux]+[:)])")
_POSSESSIVE = re.compile(r"[*+?}]\+")
_STRING_ANCHOR = re.compile(r"\\[AGZzK]")
_FUZZY = re.compile(r"\{[^}]*[a-zA-Z]")


def scannable(pattern: str) -> bool:
    """Whether `matching_lines` may scan whole texts for `pattern` (see the note above)."""
    if _POSSESSIVE.search(pattern) or _STRING_ANCHOR.search(pattern) or _FUZZY.search(pattern):
        return False
    i = pattern.find("(?")
    while i >= 0:
        if (i > 0 and pattern[i - 1] == "\\") or not _INLINE_OK.match(pattern, i):
            return False
        i = pattern.find("(?", i + 2)
    return True


def matching_lines(regex: re.Pattern[str], whole: re.Pattern[str] | None, f: TextFile,
                   deadline: float) -> Iterator[tuple[int, str]]:
    """(line number, line) of each line of `f` that `regex` matches on its own. `whole` is the
    same pattern compiled MULTILINE (None when not `scannable`). Raises TimeoutError past
    `deadline` (monotonic)."""
    if not f.has_lines:
        return
    text = f.text
    if whole is None:
        for n, line in enumerate(text.split("\n"), 1):
            if regex.search(line, timeout=_left(deadline)):
                yield n, line
        return
    pos, lineno, counted = 0, 1, 0
    end = len(text)
    while pos <= end:
        m = whole.search(text, pos, timeout=_left(deadline))
        if m is None:
            return
        q = m.start()
        ls = max(text.rfind("\n", pos, q) + 1, pos)
        le = text.find("\n", q)
        le = end if le < 0 else le
        lineno += text.count("\n", counted, ls)
        counted = ls
        line = text[ls:le]
        if regex.search(line, timeout=_left(deadline)):
            yield lineno, line
        pos = le + 1


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)
