"""The phase report renderer, on made-up evaluation results."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from codeadapt import evaluate, report


def _eval(k: int, n: int, adapter_bytes: int | None) -> dict[str, Any]:
    metrics = {}
    for m in evaluate.METRICS:
        lo, hi = evaluate.wilson(k, n)
        metrics[m] = {"k": k, "n": n, "accuracy": k / n, "lo": lo, "hi": hi}
    return {"prompts": n, "load_s": 0.25, "gen_s_per_prompt": 0.125, "tokens_per_s": 512.0,
            "adapter_bytes": adapter_bytes, "metrics": metrics}


ROWS = [
    {"phase": "phase6", "examples": 587, "eval": _eval(18, 30, 3 * 1024 * 1024)},
    {"phase": "base", "examples": None, "eval": _eval(0, 30, None)},
    {"phase": "phase5", "examples": 148, "eval": _eval(9, 30, 3 * 1024 * 1024)},
]


def test_phase_table_puts_base_first_and_flattens() -> None:
    table = report.phase_table(ROWS)
    assert [r["phase"] for r in table] == ["base", "phase6", "phase5"]
    row = table[1]
    assert row["examples"] == 587 and row["accuracy"] == 0.6 and row["lo"] < 0.6 < row["hi"]
    assert row["adapter_bytes"] == 3 * 1024 * 1024 and row["format"] == 0.6
    assert table[0]["adapter_bytes"] is None


def test_phase_table_needs_one_base_row() -> None:
    with pytest.raises(ValueError, match="exactly one row with phase 'base'"):
        report.phase_table(ROWS[:1])


def test_write_report_writes_table_and_chart_atomically(tmp_path: Path) -> None:
    out = tmp_path / "adapters"
    path = report.write_report(ROWS, out, notes="Fixed set: data/eval/fixed.jsonl")
    assert path == out / "REPORT.md"
    text = path.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| phase | train examples | prompts | load s")
    assert lines[1].startswith("| base | – | 30 | 0.25 | 0.125 | 512 | 0.0% [0.0%, 11.4%]")
    assert "| phase6 | 587 | 30 |" in lines[2] and lines[2].endswith("| 3.0 MiB |")
    assert "![accuracy per phase](accuracy.png)" in text and "Fixed set" in text
    png = (out / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert sorted(os.listdir(out)) == ["REPORT.md", "accuracy.png"]  # no temp files left
    assert (out / "REPORT.md").stat().st_mode & 0o777 == 0o644
    report.write_report(ROWS[1:], out)  # rewriting replaces both
    assert "phase6" not in (out / "REPORT.md").read_text()
