"""The phase report renderer, on made-up evaluation results."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from codeadapt import evaluate, report


def _eval(k: int, n: int, adapter_bytes: int | None) -> dict[str, Any]:
    """Every metric k/n, except overall ("correct") and answer, which get k + 3 of n + 10."""
    metrics = {}
    for m in evaluate.METRICS:
        kk, nn = (k + 3, n + 10) if m in ("correct", "answer") else (k, n)
        lo, hi = evaluate.wilson(kk, nn)
        metrics[m] = {"k": kk, "n": nn, "accuracy": kk / nn, "lo": lo, "hi": hi}
    metrics["answer"]["f1_rule"] = 2
    return {"prompts": n, "load_s": 0.25, "gen_s_per_prompt": 0.125, "tokens_per_s": 512.0,
            "adapter_bytes": adapter_bytes, "metrics": metrics}


ROWS = [
    {"phase": "phase6", "examples": 587, "training": "60 steps from phase5",
     "eval": _eval(18, 30, 3 * 1024 * 1024)},
    {"phase": "base", "examples": None, "eval": _eval(0, 30, None)},
    {"phase": "phase5", "examples": 148, "eval": _eval(9, 30, 3 * 1024 * 1024)},
]


def test_phase_table_puts_base_first_and_flattens() -> None:
    table = report.phase_table(ROWS)
    assert [r["phase"] for r in table] == ["base", "phase6", "phase5"]
    row = table[1]
    # The headline is the tool-call accuracy; overall is reported beside it.
    assert row["examples"] == 587 and row["accuracy"] == 0.6 and row["lo"] < 0.6 < row["hi"]
    assert row["overall"] == 0.525 and row["overall_lo"] < 0.525 < row["overall_hi"]
    assert row["adapter_bytes"] == 3 * 1024 * 1024 and row["format"] == 0.6
    assert row["answer"] == 0.525 and (row["answer_turns"], row["answer_f1_rule"]) == (40, 2)
    assert row["tool_call_turns"] == 30
    assert table[0]["adapter_bytes"] is None


def test_phase_table_tolerates_results_without_tool_call_accuracy() -> None:
    old = _eval(3, 30, None)
    del old["metrics"]["tool_call"]
    row = report.phase_table([{"phase": "base", "eval": old}])[0]
    assert row["accuracy"] is None and row["overall"] == 6 / 40
    assert "| – | 15.0% [" in report.markdown_table([row])


def test_phase_table_needs_one_base_row() -> None:
    with pytest.raises(ValueError, match="exactly one row with phase 'base'"):
        report.phase_table(ROWS[:1])


def test_write_report_writes_table_and_chart_atomically(tmp_path: Path) -> None:
    out = tmp_path / "adapters"
    path = report.write_report(ROWS, out, notes="Fixed set: data/eval/fixed.jsonl")
    assert path == out / "REPORT.md"
    text = path.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert lines[0] == ("| phase | trained on (examples) | training | prompts | load s | gen s/prompt | tokens/s | "
                        "tool-call accuracy (95% CI) | tool calls: trained repos | tool calls: unseen repos | "
                        "overall (95% CI) | decision | format | "
                        "name | arguments | stop | answer | executed_ok | adapter size |")
    assert lines[1].startswith("| base | – | – | 30 | 0.25 | 0.125 | 512 | 0.0% [0.0%, 11.4%] | – | – | "
                               "7.5% [2.6%, 19.9%] | 0.0% |")
    assert "| phase6 | 587 | 60 steps from phase5 | 30 |" in lines[2] and lines[2].endswith("| 3.0 MiB |")
    assert "![accuracy per phase](accuracy.png)" in text and "Fixed set" in text
    assert "**Tool-call accuracy** (the headline)" in text and "token F1 of at least 0.5" in text
    assert "scored by token F1 >= 0.5 because the expected answer has no fact tokens: base 2/40, " \
           "phase6 2/40, phase5 2/40." in text
    png = (out / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert sorted(os.listdir(out)) == ["REPORT.md", "accuracy.png"]  # no temp files left
    assert (out / "REPORT.md").stat().st_mode & 0o777 == 0o644
    report.write_report(ROWS[1:], out)  # rewriting replaces both
    assert "phase6" not in (out / "REPORT.md").read_text()


def test_chart_tolerates_bounds_a_hair_past_the_estimate(tmp_path):
    from codeadapt import report

    row = {"phase": "base", "accuracy": 0.0, "lo": 1e-17, "hi": 0.03, "overall": 0.5,
           "overall_lo": 0.5000000001, "overall_hi": 0.6}
    report._chart([row, {**row, "phase": "p"}], str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 0


def test_agentic_rows_get_their_own_table_and_bars(tmp_path: Path) -> None:
    from codeadapt import agentic

    t = agentic.Task("t1", "s", "grep_class", ".", {"role": "system", "content": ""}, "q", "`A`", 1,
                     (), "s/a.py")
    outcomes = [agentic.Outcome("t1", True, calls=2)]
    result = {"tasks": 1, "kinds": {"grep": 1}, "summary": agentic.summarize_tasks([t], outcomes)}
    rows = [{**r, "agentic": result} for r in ROWS]
    text = report.write_report(rows, tmp_path).read_text()
    section = text.split("## Agentic tasks", 1)[1]
    assert "| base | 1 | 100.0% [" in section and "| 2.00 |" in section and "(grep 1)" in section
    assert "held-out repos" in section and "| – |" in section  # no repo-held-out task here
    assert (tmp_path / report.CHART_FILE).stat().st_size > 1000
    assert "longer than `agentic.max_tokens`" not in section
    rows = [{**r, "agentic": {**result, "over_cap": 2}} for r in ROWS]
    section = report.write_report(rows, tmp_path).read_text().split("## Agentic tasks", 1)[1]
    assert "2 task(s) expect an answer longer than `agentic.max_tokens`" in section


def test_turn_table_splits_trained_and_unseen_repositories() -> None:
    ev = _eval(18, 30, None)
    lo, hi = evaluate.wilson(2, 10)
    ev["metrics_by_origin"] = {"held_out_repos": {"tool_call": {"accuracy": 0.2, "lo": lo, "hi": hi, "n": 10}}}
    rows = [{"phase": "base", "examples": None, "eval": ev}]
    table = report.phase_table(rows)
    assert table[0]["held_out_repos"] == 0.2 and table[0]["trained_repos"] is None
    md = report.markdown_table(table)
    assert "tool calls: unseen repos" in md and "20.0% [" in md and "(n=10)" in md
