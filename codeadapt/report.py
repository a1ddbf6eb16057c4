"""The phase comparison: one table row per adapter (plus the base model) from evaluation
results, written as `adapters/REPORT.md` with a bar chart of the tool-call accuracy (headline)
and the overall accuracy, each with its 95% Wilson interval. Metric definitions:
`codeadapt.evaluate`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPORT_FILE = "REPORT.md"
CHART_FILE = "accuracy.png"
BASE = "base"
# Headline: "accuracy" is the tool-call accuracy (turns that expect a call); "overall" is
# "correct" (every turn by its own criterion). Then the per-check rates, in this order.
HEADLINE, OVERALL = "tool_call", "correct"
METRIC_COLUMNS = ("decision", "format", "name", "arguments", "stop", "answer", "executed_ok")


def phase_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat table rows, base model first: `rows` are {"phase", "examples", "eval"} where
    "eval" is what `evaluate.evaluate_model` returned."""
    flat = []
    for row in rows:
        ev = row["eval"]
        metrics = ev["metrics"]
        head = metrics.get(HEADLINE, {})  # absent from results older than the metric
        overall = metrics[OVERALL]
        answer = metrics.get("answer", {})
        flat.append({
            "phase": row["phase"],
            "examples": row.get("examples"),
            "training": row.get("training"),
            "prompts": ev["prompts"],
            "load_s": ev["load_s"],
            "gen_s_per_prompt": ev["gen_s_per_prompt"],
            "tokens_per_s": ev.get("tokens_per_s"),
            "accuracy": head.get("accuracy"),
            "lo": head.get("lo"),
            "hi": head.get("hi"),
            "tool_call_turns": head.get("n"),
            "overall": overall["accuracy"],
            "overall_lo": overall["lo"],
            "overall_hi": overall["hi"],
            **{m: metrics.get(m, {}).get("accuracy") for m in METRIC_COLUMNS},
            "answer_turns": answer.get("n"),
            "answer_f1_rule": answer.get("f1_rule"),
            "adapter_bytes": ev.get("adapter_bytes"),
            **_origin_cells(ev),
            **_agentic_cells(row.get("agentic")),
        })
    bases = [r for r in flat if r["phase"] == BASE]
    if len(bases) != 1:
        raise ValueError(f"need exactly one row with phase {BASE!r}, got {len(bases)}: "
                         f"{[r['phase'] for r in flat]}")
    return bases + [r for r in flat if r["phase"] != BASE]


def _origin_cells(ev: dict[str, Any]) -> dict[str, Any]:
    """Tool-call accuracy on files of trained repositories vs. repositories never trained on."""
    out: dict[str, Any] = {}
    for origin in ("trained_repos", "held_out_repos"):
        m = ev.get("metrics_by_origin", {}).get(origin, {}).get(HEADLINE, {})
        out |= {origin: m.get("accuracy"), f"{origin}_lo": m.get("lo"), f"{origin}_hi": m.get("hi"),
                f"{origin}_n": m.get("n")}
    return out


def _agentic_cells(result: dict[str, Any] | None) -> dict[str, Any]:
    if not result:
        return {"agentic": None, "agentic_lo": None, "agentic_hi": None}
    a = result["summary"]["all"]
    return {"agentic": a["success"], "agentic_lo": a["lo"], "agentic_hi": a["hi"],
            "agentic_summary": result["summary"], "agentic_tasks": result["tasks"],
            "agentic_kinds": result.get("kinds", {}), "agentic_over_cap": result.get("over_cap")}


def agentic_markdown(table: Sequence[dict[str, Any]]) -> str:
    """The agentic table: task success (all, held-out files, held-out repositories), calls,
    invalid calls, time, and why tasks failed."""
    rows = [r for r in table if r.get("agentic_summary")]
    if not rows:
        return ""
    head = ["phase", "tasks", "task success (95% CI)", "held-out files", "held-out repos",
            "calls/task", "invalid calls", "s/task", "failures"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sm = r["agentic_summary"]
        a, f, h = sm["all"], sm["held_out_files"], sm["held_out_repos"]
        part = lambda x: "–" if not x["n"] else f"{_pct(x['success'])} ({x['k']}/{x['n']})"  # noqa: E731
        fails = ", ".join(f"{k} {v}" for k, v in sm["failures"].items()) or "–"
        lines.append("| " + " | ".join([
            r["phase"], str(a["n"]), _ci(a["success"], a["lo"], a["hi"]), part(f), part(h),
            _num(a["calls_per_task"], ".2f"), _pct(a["invalid_call_rate"]),
            _num(a["seconds_per_task"], ".1f"), fails]) + " |")
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(rows[0].get("agentic_kinds", {}).items()))
    over = max((r.get("agentic_over_cap") or 0 for r in rows), default=0)
    if over:
        lines.append(f"\n{over} task(s) expect an answer longer than `agentic.max_tokens`: no "
                     "model row can pass them (raise the limit).")
    return ("\n## Agentic tasks\n\nThe model gets only the question, calls the real tools on the "
            "pinned checkout in a loop and is scored on its final answer (lists by precision and "
            "recall of their items, F1 >= 0.8; other answers by their facts and yes/no polarity); "
            "every row runs the same tasks" + (f" ({kinds})" if kinds else "") + ".\n\n"
            + "\n".join(lines) + "\n")


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _ci(v: float | None, lo: float | None, hi: float | None) -> str:
    return "–" if v is None else f"{_pct(v)} [{_pct(lo)}, {_pct(hi)}]"


def markdown_table(table: Sequence[dict[str, Any]]) -> str:
    head = ["phase", "trained on (examples)", "training", "prompts", "load s", "gen s/prompt", "tokens/s",
            "tool-call accuracy (95% CI)", "tool calls: trained repos", "tool calls: unseen repos",
            "overall (95% CI)", *METRIC_COLUMNS, "adapter size"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["phase"], "–" if r["examples"] is None else str(r["examples"]),
                 r.get("training") or "–", str(r["prompts"]),
                 _num(r["load_s"], ".2f"), _num(r["gen_s_per_prompt"], ".3f"),
                 _num(r["tokens_per_s"], ".0f"), _ci(r["accuracy"], r["lo"], r["hi"]),
                 *(_ci(r.get(o), r.get(f"{o}_lo"), r.get(f"{o}_hi"))
                   + (f" (n={r[f'{o}_n']})" if r.get(f"{o}_n") else "")
                   for o in ("trained_repos", "held_out_repos")),
                 _ci(r["overall"], r["overall_lo"], r["overall_hi"]),
                 *(_pct(r[m]) for m in METRIC_COLUMNS), _size(r["adapter_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename onto `path`, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _chart(table: Sequence[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["phase"] for r in table]
    fig, ax = plt.subplots(figsize=(1.5 * len(names) + 2.5, 3.8))
    width = 0.38
    series = [("tool-call accuracy", "accuracy", "lo", "hi", "#3b75af", -width / 2),
              ("overall (calls + answers)", "overall", "overall_lo", "overall_hi", "#9dbbd8",
               width / 2)]
    if any(r.get("agentic") is not None for r in table):
        width = 0.27
        series = [("tool-call accuracy", "accuracy", "lo", "hi", "#3b75af", -width),
                  ("overall (calls + answers)", "overall", "overall_lo", "overall_hi", "#9dbbd8", 0.0),
                  ("agentic task success", "agentic", "agentic_lo", "agentic_hi", "#e08a3c", width)]
    for label, key, lo_key, hi_key, color, shift in series:
        vals = [r[key] or 0.0 for r in table]
        los = [r[lo_key] if r[key] is not None else 0.0 for r in table]
        his = [r[hi_key] if r[key] is not None else 0.0 for r in table]
        xs = [x + shift for x in range(len(names))]
        # Clamped: float rounding can put a Wilson bound a hair past the point estimate.
        err = [[max(v - lo, 0.0) for v, lo in zip(vals, los)], [max(hi - v, 0.0) for v, hi in zip(vals, his)]]
        ax.bar(xs, vals, width, yerr=err, capsize=4, color=color, label=label)
        for x, v, hi, r in zip(xs, vals, his, table):
            text = "–" if r[key] is None else f"{100 * v:.0f}%"
            ax.text(x, min(hi + 0.02, 1.0), text, ha="center", fontsize=8)  # above the bar
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("accuracy")
    ax.set_title("Eval accuracy per phase, 95% Wilson interval")
    ax.legend(loc="upper left", fontsize=8, frameon=False, ncols=2)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


METRICS_NOTE = (
    "**Tool-call accuracy** (the headline) counts only turns that expect a tool call: the "
    "output is a well-formed call to the right tool with matching arguments (grep: a pattern "
    "that finds the same lines on the checkout also matches, and where the expected search "
    "finds nothing and the conversation then refines it, a search that already finds every "
    "line the refined one finds, with at most 2x + 10 lines; read_file: a range of the same "
    "file that shows every expected line and at most 2x + 10 lines) and nothing after it. "
    "**Overall** scores every turn by its own criterion: tool-call turns as above, answer "
    "turns by `answer`. `answer` counts turns that expect a direct or final answer: no "
    "tool-call markup or invented turns, and every fact token of the expected answer "
    "(backticked spans and code lines, quoted strings, file paths, numbers) appears in the "
    "output; expected answers without fact tokens (free-text paraphrases) need a token F1 of "
    "at least 0.5 against it instead. `decision` (call vs answer), `format` and `stop` count "
    "every turn; `name`/`arguments` the turns that expect a call; `executed_ok` the model's "
    "calls that ran without a tool error. An answer also fails when its first sentence has the "
    "opposite yes/no polarity, when it only repeats the question, or when it mostly pastes the "
    "last tool result. Intervals are 95% Wilson intervals on the effective sample size: turns "
    "about one source file are clustered (design effect from the between-file variance; the "
    "number of files when every turn agrees), so 40 turns from 5 files do not count as 40 "
    "independent ones. The `rules` row is `codeadapt.baseline`: regexes over the visible "
    "conversation, no model. Adapter size is the final `adapters.safetensors` only.\n"
)


def _f1_note(table: Sequence[dict[str, Any]]) -> str:
    parts = [f"{r['phase']} {r['answer_f1_rule']}/{r['answer_turns']}" for r in table
             if r.get("answer_f1_rule") is not None]
    if not parts:
        return ""
    return ("\nAnswer turns scored by token F1 >= 0.5 because the expected answer has no fact "
            "tokens: " + ", ".join(parts) + ".\n")


def write_report(rows: Sequence[dict[str, Any]], out_dir: Path, title: str = "Adapter report",
                 notes: str = "") -> Path:
    """Write `out_dir/REPORT.md` and `out_dir/accuracy.png` (each atomically); return the report."""
    table = phase_table(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / CHART_FILE, lambda tmp: _chart(table, tmp))
    text = (
        f"# {title}\n\n{markdown_table(table)}\n![accuracy per phase]({CHART_FILE})\n\n"
        + METRICS_NOTE + _f1_note(table) + agentic_markdown(table)
        + (f"\n{notes.strip()}\n" if notes.strip() else "")
    )
    path = out_dir / REPORT_FILE
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path
