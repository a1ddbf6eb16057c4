"""What changed between two runs: moved sources, examples added/removed, retraining,
eval deltas, and the promotion rule for new adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def snapshot(data_dir: Path, phases: list[str]) -> dict[str, Any]:
    """Per phase: inputs hash, source commits and example ids per source (from manifests)."""
    out: dict[str, Any] = {}
    for p in phases:
        path = Path(data_dir) / p / "manifest.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        ids: dict[str, list[str]] = {}
        for e in m["examples"]:
            ids.setdefault(e["source"], []).append(e["id"])
        out[p] = {"inputs_hash": m.get("inputs_hash"),
                  "commits": {n: s.get("commit") for n, s in m["inputs"]["sources"].items()},
                  "ids": ids}
    return out


def diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Sources that moved (old → new commit) and examples added/removed per phase and source."""
    moved: dict[str, tuple[str | None, str | None]] = {}
    phases: dict[str, Any] = {}
    for p, new in after.items():
        old = before.get(p, {"inputs_hash": None, "commits": {}, "ids": {}})
        for name, commit in new["commits"].items():
            if old["commits"].get(name) != commit:
                moved[name] = (old["commits"].get(name), commit)
        per_source = {}
        for s in sorted(set(new["ids"]) | set(old["ids"])):
            a, b = set(old["ids"].get(s, [])), set(new["ids"].get(s, []))
            if a != b:
                per_source[s] = {"added": len(b - a), "removed": len(a - b)}
        phases[p] = {"changed": old["inputs_hash"] != new["inputs_hash"], "sources": per_source}
    return {"moved": moved, "phases": phases}


def promotion(new: dict[str, Any], current: dict[str, Any] | None) -> tuple[bool, str]:
    """Promote unless the new adapter's tool-call accuracy is worse than the current one's
    beyond the 95% intervals."""
    if current is None:
        return True, "no current adapter"
    n, c = new["metrics"]["tool_call"], current["metrics"]["tool_call"]
    if n["hi"] < c["lo"]:
        return False, (f"worse beyond the intervals: {n['accuracy']:.1%} [{n['lo']:.1%}, {n['hi']:.1%}]"
                       f" vs current {c['accuracy']:.1%} [{c['lo']:.1%}, {c['hi']:.1%}]")
    return True, (f"not worse beyond the intervals: {n['accuracy']:.1%} vs current {c['accuracy']:.1%}")


def markdown(d: dict[str, Any], trained: dict[str, str], decisions: dict[str, tuple[bool, str]],
             deltas: dict[str, tuple[float | None, float]]) -> str:
    """The "what changed since the last run" artifact."""
    lines = ["# What changed since the last run", ""]
    if d["moved"]:
        lines += ["## Sources that moved", "", "| source | old | new |", "|---|---|---|"]
        lines += [f"| {n} | `{(o or 'new')[:12]}` | `{(c or 'gone')[:12]}` |" for n, (o, c) in sorted(d["moved"].items())]
    else:
        lines += ["No source moved."]
    lines += ["", "## Examples", "", "| phase | dataset | source | added | removed |", "|---|---|---|---|---|"]
    for p, info in d["phases"].items():
        state = "rebuilt" if info["changed"] else "unchanged"
        if not info["sources"]:
            lines.append(f"| {p} | {state} | — | 0 | 0 |")
        for s, c in info["sources"].items():
            lines.append(f"| {p} | {state} | {s} | {c['added']} | {c['removed']} |")
    lines += ["", "## Training and promotion", "", "| phase | training | promoted | why |", "|---|---|---|---|"]
    for p, how in trained.items():
        ok, why = decisions.get(p, (None, ""))
        lines.append(f"| {p} | {how} | {'yes' if ok else 'no' if ok is False else '—'} | {why} |")
    lines += ["", "## Eval deltas (tool-call accuracy on the held-out prompts)", "",
              "| row | before | now | delta |", "|---|---|---|---|"]
    for row, (old, new) in deltas.items():
        delta = f"{100 * (new - old):+.1f} pts" if old is not None else "—"
        lines.append(f"| {row} | {'—' if old is None else f'{old:.1%}'} | {new:.1%} | {delta} |")
    return "\n".join(lines) + "\n"
