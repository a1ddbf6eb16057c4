"""Rerun every tool call of the fixed eval set on the synced checkouts and rewrite its results.

The fixed set (`data/eval/fixed.jsonl`) is a yardstick shared by all phases; its records are
`{"messages", "tools", "meta": {"id", "source", "kind"}}` and each call runs in
`<repos>/<meta.source>` (the offline profile's snapshots). Tool results are never typed:

    uv run python scripts/fill_fixed_set.py data/eval/fixed.jsonl --repos data/repos

`--check` writes nothing and exits 1 when a result no longer replays (a source changed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from codeadapt.handwritten import refill_tool_results
from codeadapt.prompts import load_fixed_set


def fill(path: Path, repos: Path) -> tuple[list[str], list[str]]:
    """The refilled lines of `path` and the ids of the records that changed."""
    lines, changed = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        root = repos / record["meta"]["source"]
        if not root.is_dir():
            raise FileNotFoundError(f"{path}:{lineno}: checkout {root} does not exist")
        new = refill_tool_results(record, root)
        if new != record:
            changed.append(record["meta"]["id"])
        lines.append(json.dumps(new, ensure_ascii=False))
    return lines, changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--repos", type=Path, default=Path("data/repos"), help="synced checkouts")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = ap.parse_args(argv)
    lines, changed = fill(args.file, args.repos)
    if args.check:
        print(f"{args.file}: {len(lines)} records, stale: {changed or 'none'}")
        return 1 if changed else 0
    fd, tmp = tempfile.mkstemp(dir=args.file.parent, prefix=f".{args.file.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, args.file)
    load_fixed_set(args.file, args.repos)  # still valid
    print(f"{args.file}: {len(lines)} records, {len(changed)} refilled from {args.repos}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
