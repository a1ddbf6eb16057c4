"""The phase comparison: one table row per adapter (plus the base model) from evaluation
results, written as `adapters/REPORT.md` with a bar chart of accuracy and its 95% interval."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPORT_FILE = "REPORT.md"
CHART_FILE = "accuracy.png"
BASE = "base"
# Column order of the per-metric accuracies; "correct" is the headline accuracy.
METRIC_COLUMNS = ("format", "decision", "name", "arguments", "stop", "executed_ok")


def phase_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat table rows, base model first: `rows` are {"phase", "examples", "eval"} where
    "eval" is what `evaluate.evaluate_model` returned."""
    flat = []
    for row in rows:
        ev = row["eval"]
        correct = ev["metrics"]["correct"]
        flat.append({
            "phase": row["phase"],
            "examples": row.get("examples"),
            "prompts": ev["prompts"],
            "load_s": ev["load_s"],
            "gen_s_per_prompt": ev["gen_s_per_prompt"],
            "tokens_per_s": ev.get("tokens_per_s"),
            "accuracy": correct["accuracy"],
            "lo": correct["lo"],
            "hi": correct["hi"],
            **{m: ev["metrics"].get(m, {}).get("accuracy") for m in METRIC_COLUMNS},
            "adapter_bytes": ev.get("adapter_bytes"),
        })
    bases = [r for r in flat if r["phase"] == BASE]
    if len(bases) != 1:
        raise ValueError(f"need exactly one row with phase {BASE!r}, got {len(bases)}: "
                         f"{[r['phase'] for r in flat]}")
    return bases + [r for r in flat if r["phase"] != BASE]


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


def markdown_table(table: Sequence[dict[str, Any]]) -> str:
    head = ["phase", "train examples", "prompts", "load s", "gen s/prompt", "tokens/s",
            "accuracy (95% CI)", *METRIC_COLUMNS, "adapter size"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["phase"], "–" if r["examples"] is None else str(r["examples"]), str(r["prompts"]),
                 _num(r["load_s"], ".2f"), _num(r["gen_s_per_prompt"], ".3f"),
                 _num(r["tokens_per_s"], ".0f"),
                 f"{_pct(r['accuracy'])} [{_pct(r['lo'])}, {_pct(r['hi'])}]",
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
    acc = [r["accuracy"] or 0.0 for r in table]
    err = [[a - r["lo"] for a, r in zip(acc, table)], [r["hi"] - a for a, r in zip(acc, table)]]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    ax.bar(names, acc, yerr=err, capsize=6, color=["#999999"] + ["#3b75af"] * (len(names) - 1))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (turn fully correct)")
    ax.set_title("Eval accuracy per phase, 95% Wilson interval")
    for x, (a, r) in enumerate(zip(acc, table)):
        ax.text(x, min(r["hi"] + 0.02, 0.95), f"{100 * a:.0f}%", ha="center")  # above the bar
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def write_report(rows: Sequence[dict[str, Any]], out_dir: Path, title: str = "Adapter report",
                 notes: str = "") -> Path:
    """Write `out_dir/REPORT.md` and `out_dir/accuracy.png` (each atomically); return the report."""
    table = phase_table(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / CHART_FILE, lambda tmp: _chart(table, tmp))
    text = (
        f"# {title}\n\n{markdown_table(table)}\n![accuracy per phase]({CHART_FILE})\n\n"
        "Accuracy: the predicted turn has a well-formed tool call or answer, makes the right "
        "decision (call or answer), calls the right tool with matching arguments (grep: same "
        "results on the checkout also match), and stops after the call. Intervals are 95% "
        "Wilson intervals. `name`/`arguments` count turns that expect a call; `executed_ok` "
        "counts the model's calls that ran without a tool error. Adapter size is the final "
        "`adapters.safetensors` only.\n"
        + (f"\n{notes.strip()}\n" if notes.strip() else "")
    )
    path = out_dir / REPORT_FILE
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path
