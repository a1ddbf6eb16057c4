import json
from pathlib import Path

from codeadapt import changes


def manifest(dir_: Path, phase: str, commits: dict[str, str], ids: dict[str, list[str]], h: str) -> None:
    (dir_ / phase).mkdir(parents=True, exist_ok=True)
    m = {"inputs_hash": h, "inputs": {"sources": {n: {"commit": c} for n, c in commits.items()}},
         "examples": [{"source": s, "id": i} for s, xs in ids.items() for i in xs]}
    (dir_ / phase / "manifest.json").write_text(json.dumps(m))


def test_diff_names_moved_sources_and_example_churn(tmp_path: Path):
    manifest(tmp_path, "p6", {"a": "1" * 40, "b": "2" * 40}, {"a": ["x", "y"], "b": ["z"]}, "h1")
    before = changes.snapshot(tmp_path, ["p6", "p7"])
    manifest(tmp_path, "p6", {"a": "1" * 40, "b": "3" * 40}, {"a": ["x", "y"], "b": ["z2", "z3"]}, "h2")
    d = changes.diff(before, changes.snapshot(tmp_path, ["p6", "p7"]))
    assert d["moved"] == {"b": ("2" * 40, "3" * 40)}
    assert d["phases"]["p6"] == {"changed": True, "sources": {"b": {"added": 2, "removed": 1}}}
    md = changes.markdown(d, {"p6": "trained"}, {"p6": (True, "no current adapter")}, {"p6": (0.5, 0.6)})
    assert "| b | `222222222222` | `333333333333` |" in md and "+10.0 pts" in md


def test_nothing_changed():
    snap = {"p": {"inputs_hash": "h", "commits": {"a": "1"}, "ids": {"a": ["x"]}}}
    d = changes.diff(snap, snap)
    assert d == {"moved": {}, "phases": {"p": {"changed": False, "sources": {}}}}
    assert "No source moved." in changes.markdown(d, {}, {}, {})


def ev(acc: float, lo: float, hi: float) -> dict:
    return {"metrics": {"tool_call": {"accuracy": acc, "lo": lo, "hi": hi}}}


def test_promotion_only_refuses_worse_beyond_the_intervals():
    assert changes.promotion(ev(0.5, 0.4, 0.6), None)[0]
    assert changes.promotion(ev(0.45, 0.35, 0.55), ev(0.5, 0.4, 0.6))[0]  # overlapping: promote
    ok, why = changes.promotion(ev(0.2, 0.1, 0.3), ev(0.6, 0.5, 0.7))
    assert not ok and "worse beyond the intervals" in why
