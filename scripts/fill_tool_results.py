"""Rerun every tool call in a hand-written JSONL file and rewrite the tool results.

Tool results in shipped examples must be exactly what `codeadapt.tools` returns, so they are
never typed by hand: write the questions, calls and answers, then run

    uv run python scripts/fill_tool_results.py data/handwritten/phase5.jsonl

Calls without a result message get one; `tools` is reset to the current schemas. The file is
validated before it is replaced (temp file, then os.replace). `--check` only reports.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

from codeadapt.handwritten import parse_record, refill_tool_results


def default_root() -> Path:
    """The site-packages dir holding svcs: the offline svcs snapshot has the same paths."""
    spec = importlib.util.find_spec("svcs")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("svcs is not installed; pass --root")
    return Path(spec.origin).parent.parent


def fill(path: Path, root: Path) -> tuple[list[str], int]:
    """The refilled lines of `path` and how many of its records changed."""
    lines, changed = [], 0
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            new = refill_tool_results(record, root)
            parse_record(new)
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}:{lineno}: {exc}") from None
        changed += new != record
        lines.append(json.dumps(new, ensure_ascii=False))
    return lines, changed


def write_atomic(path: Path, lines: list[str]) -> None:
    # mkstemp makes 0600 files; keep the shipped file's mode instead.
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="hand-written JSONL file to refill in place")
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="directory the tool paths are relative to "
        "(default: the site-packages dir holding svcs)",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if any record would change"
    )
    args = parser.parse_args(argv)
    root = args.root or default_root()
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a directory")
    lines, changed = fill(args.file, root)
    if args.check:
        print(f"{args.file}: {len(lines)} examples, {changed} out of date against {root}")
        return 1 if changed else 0
    write_atomic(args.file, lines)
    print(f"{args.file}: {len(lines)} examples, {changed} refilled from {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
