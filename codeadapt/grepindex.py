"""Grep's engine: the text files of one checkout, read once, and a line search that scans a
file's whole text with one regex instead of one call per line.

Example generation runs hundreds of greps over the same pinned checkout, and the dataset build
replays them all; without an index each grep walks the tree, stats and decodes every file
again, and runs the pattern line by line, so an example's cost grows with its repository
(transformers: ~2 s a grep). `TreeIndex` holds every text file of a checkout as one UTF-8
blob, built once per checkout (`tools.indexed`). A pattern with a required literal (a name:
most searches) jumps from one occurrence of it to the next with `bytes.find` over the whole
tree and tests only those lines; others scan each file's text with one MULTILINE search, or
line by line where that could differ. Results are the same as a per-line search, line for
line (tested against one on edge-case files and patterns, and on a real package tree)."""

from __future__ import annotations

import bisect
import fnmatch
import os
import time
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from re import _constants as sre_c
from re import _parser as sre_parse
from typing import Any

import regex as re


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


def _read(file: Path, max_bytes: int) -> list[str] | None:
    try:
        if file.stat().st_size > max_bytes:
            return None
        return decode(file.read_bytes())
    except OSError:
        return None


SAMPLE_BYTES = 1_000_000
BAD_NAME = re.compile(r"[\x00-\x1f\x7f]")  # a control character in a path (grep and extract skip it)


class TreeIndex:
    """Text files under `root` as grep reads them (lines joined by "\\n", what
    `str.splitlines` gives), sorted by relative path, in one UTF-8 blob with offsets. `paths`:
    these files only (default: every file under `root`)."""

    def __init__(self, root: Path, max_bytes: int, paths: Iterable[Path] | None = None) -> None:
        self.root = root
        found = []
        for p in walk(root) if paths is None else paths:
            rel = p.relative_to(root).as_posix()
            if BAD_NAME.search(rel):  # a newline in a name would break `path:line:text`
                continue
            lines = _read(p, max_bytes)
            if lines is not None:
                found.append((rel, p.name, lines))
        found.sort(key=lambda f: f[0])
        self.rels = [f[0] for f in found]
        self.names = [f[1] for f in found]
        self.has_lines = [bool(f[2]) for f in found]
        parts = ["\n".join(f[2]).encode("utf-8") for f in found]
        self.starts, self.ends = array("q"), array("q")
        at = 0
        for b in parts:
            self.starts.append(at)
            self.ends.append(at + len(b))
            at += len(b) + 1
        self.blob = b"\n".join(parts)

    def under(self, start: Path) -> tuple[int, int]:
        """The range of files below directory `start` (inside the root)."""
        rel = start.relative_to(self.root).as_posix()
        if rel == ".":
            return 0, len(self.rels)
        prefix = rel + "/"
        return (bisect.bisect_left(self.rels, prefix),
                bisect.bisect_left(self.rels, prefix + "\U0010ffff"))

    def text(self, i: int) -> str:
        return self.blob[self.starts[i]:self.ends[i]].decode("utf-8")

    def grep(self, regex: re.Pattern[str], pattern: str, files: tuple[int, int], glob: str | None,
             deadline: float) -> Iterator[tuple[str, int, str]]:
        """(path, line number, line) of each line `regex` matches on its own, in path order,
        among `files` whose name matches `glob`. Raises TimeoutError past `deadline`."""
        lo, hi = files
        if lo >= hi:
            return
        keep = [bool(self.has_lines[i]) and (not glob or fnmatch.fnmatch(self.names[i], glob))
                for i in range(lo, hi)]
        need = required_literals(pattern)
        if need:
            yield from self._around(regex, self._rarest(need, lo, hi), lo, hi, keep, deadline)
            return
        whole = re.compile(pattern, re.MULTILINE) if scannable(pattern) else None
        for i in range(lo, hi):
            if keep[i - lo]:
                for n, line in _scan(regex, whole, self.text(i), deadline):
                    yield self.rels[i], n, line

    def _rarest(self, need: tuple[str, ...], lo: int, hi: int) -> bytes:
        """The literal with the fewest hits in a sample of the files (then the longest)."""
        start = self.starts[lo]
        sample = self.blob[start:min(self.ends[hi - 1], start + SAMPLE_BYTES)]
        lits = [n.encode("utf-8") for n in need]
        return min(lits, key=lambda b: (sample.count(b), -len(b)))

    def _around(self, regex: re.Pattern[str], lit: bytes, lo: int, hi: int, keep: list[bool],
                deadline: float) -> Iterator[tuple[str, int, str]]:
        """Only lines holding `lit` can match: jump between its occurrences in the blob."""
        blob, starts, ends = self.blob, self.starts, self.ends
        pos, limit = starts[lo], ends[hi - 1]
        cur, counted, lineno = -1, 0, 1
        while True:
            q = blob.find(lit, pos, limit)
            if q < 0:
                return
            i = bisect.bisect_right(starts, q, lo, hi) - 1
            if q >= ends[i] or not keep[i - lo]:  # a separator, or a file the glob leaves out
                pos = ends[i] + 1
                continue
            if i != cur:
                cur, counted, lineno = i, starts[i], 1
            ls = blob.rfind(b"\n", counted, q) + 1 or counted
            le = blob.find(b"\n", q, ends[i])
            le = ends[i] if le < 0 else le
            lineno += blob.count(b"\n", counted, ls)
            counted = ls
            line = blob[ls:le].decode("utf-8")
            if regex.search(line, timeout=_left(deadline)):
                yield self.rels[i], lineno, line
            pos = le + 1


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
    """Whether `TreeIndex.grep` may scan whole texts for `pattern` (see the note above)."""
    if _POSSESSIVE.search(pattern) or _STRING_ANCHOR.search(pattern) or _FUZZY.search(pattern):
        return False
    i = pattern.find("(?")
    while i >= 0:
        if (i > 0 and pattern[i - 1] == "\\") or not _INLINE_OK.match(pattern, i):
            return False
        i = pattern.find("(?", i + 2)
    return True


_BRACES = re.compile(r"\{([^}]*)\}")
_COUNT = re.compile(r"\d*(?:,\d*)?")
MIN_LITERAL = 2


def required_literals(pattern: str) -> tuple[str, ...]:
    """Runs of plain characters (2 or more, longest first) every match of `pattern` contains.

    A line without them cannot match, so a file without one is skipped with a `str.find`, and
    within a file only the lines around the longest one's occurrences are searched. Read from the standard
    library's parse of the pattern, only where `regex` reads the same syntax: not
    case-insensitive, no fuzzy or odd `{...}`, no POSIX classes; a pattern `re` cannot parse
    gets none."""
    if "[:" in pattern or any(not _COUNT.fullmatch(m[1]) for m in _BRACES.finditer(pattern)):
        return ()
    try:
        parsed = sre_parse.parse(pattern)
    except Exception:  # noqa: BLE001 - `regex` syntax the standard parser lacks: no shortcut
        return ()
    if parsed.state.flags & (sre_c.SRE_FLAG_IGNORECASE | sre_c.SRE_FLAG_LOCALE):
        return ()
    return tuple(sorted({r for r in _runs(parsed) if len(r) >= MIN_LITERAL}, key=lambda r: (-len(r), r)))


_CASE = sre_c.SRE_FLAG_IGNORECASE | sre_c.SRE_FLAG_LOCALE


def _runs(items: Any) -> list[str]:
    """Literal runs every match of the parsed sequence `items` contains."""
    runs, cur = [], []
    for op, av in items:
        if op is sre_c.LITERAL:
            cur.append(chr(av))
            continue
        runs.append("".join(cur))
        cur = []
        if op is sre_c.SUBPATTERN and not av[1] & _CASE:
            runs += _runs(av[3])  # a group is matched once: its own runs are required
        elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, sre_c.POSSESSIVE_REPEAT) and av[0] >= 1:
            runs += _runs(av[2])  # repeated at least once
        elif op is sre_c.BRANCH:
            runs += _common([_runs(alt) for alt in av[1]])
    runs.append("".join(cur))
    return runs


def _common(alternatives: list[list[str]]) -> list[str]:
    """The longest strings every alternative's runs contain (`from X import|import X`: " X"
    and "import")."""
    first, rest = alternatives[0], alternatives[1:]
    common = {run[i:j] for run in first for i in range(len(run))
              for j in range(i + MIN_LITERAL, len(run) + 1)
              if all(any(run[i:j] in r for r in alt) for alt in rest)}
    return [c for c in common if not any(c != d and c in d for d in common)]


def _scan(regex: re.Pattern[str], whole: re.Pattern[str] | None, text: str,
          deadline: float) -> Iterator[tuple[int, str]]:
    """(line number, line) of each line of `text` that `regex` matches on its own. `whole` is
    the same pattern compiled MULTILINE (None when not `scannable`: line by line)."""
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
