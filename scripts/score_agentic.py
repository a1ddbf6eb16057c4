"""Diagnosis (not a test): the agentic evaluation of trained adapters on more tasks than the
default run scores, without Prefect and without retraining.

    uv run python scripts/score_agentic.py --rows base,phase7,rules --tasks 100

Builds the same job as the flow's `evaluate_agentic` (`tasks.ml`): the phase's held-out files
and the held-out repositories (`eval.held_out_phase`), half each, in the same stable hash
order (so the default run's tasks are among them), the same loop, tools and scorer, in the
same worker process; prints each
row's success with its clustered interval, by column, and where the failures go, and writes
the results to `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from codeadapt.config import load_settings
    from codeadapt.worker import run_in_worker

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="base,phase7,rules",
                    help="comma-separated: base, rules, or adapter names under adapters/")
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--phase", default="phase7", help="whose held-out files to draw tasks from")
    ap.add_argument("--out", default="adapters/.agentic-scores.json")
    ap.add_argument("--transcripts", type=int, default=20,
                    help="keep the transcripts of this many tasks per row (default: %(default)s)")
    args = ap.parse_args()

    settings = load_settings(ROOT / "pipeline.toml", overrides=[f"agentic.tasks={args.tasks}"])
    data, adapters = settings.resolve(settings.paths.data), settings.resolve(settings.paths.adapters)
    held = data / settings.eval.held_out_phase if settings.eval.held_out_phase else None
    results = {}
    for row in args.rows.split(","):
        adapter = None if row in ("base", "rules") else adapters / row
        if adapter is not None and not (adapter / "adapters.safetensors").is_file():
            sys.exit(f"{adapter}: no trained adapter (run `uv run codeadapt run {args.phase}` first)")
        model = "rules" if row == "rules" else trained_base(adapters, data)
        payload = {"model_dir": str(model), "adapter_dir": str(adapter) if adapter else None,
                   "data_dir": str(data / args.phase), "repos_dir": str(settings.resolve(settings.paths.repos)),
                   "spec": settings.eval.model_dump(), "agentic": settings.agentic.model_dump(),
                   "fixed_set": None, "held_out_dir": str(held) if held else None,
                   "keep_transcripts": args.transcripts,
                   "prefill_store": str(data / "cache" / "prefill"),  # rows share the base's prefill
                   "base_top": settings.train.lora_layers}
        tic = time.perf_counter()
        if row == "rules":
            from codeadapt.agentic import agentic_job

            result = agentic_job(payload)
        else:
            result = run_in_worker("agentic", payload)
        result["wall_s"] = time.perf_counter() - tic
        results[row] = result
        _print(row, result)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))  # after each row
    _compare(results)
    print(f"wrote {args.out}")


def _compare(results: dict) -> None:
    """Success per kind for every row, and for each pair of rows the tasks both solve and each
    alone (the same tasks, so a difference is a difference on the same questions)."""
    rows = list(results)
    kinds = sorted({k for r in rows for k in results[r]["summary"].get("by_kind", {})})
    if kinds:
        print("by kind (successes/tasks): " + ", ".join(rows))
        for k in kinds:
            cells = [results[r]["summary"]["by_kind"].get(k, [0, 0]) for r in rows]
            print(f"    {k:28s} " + "  ".join(f"{a}/{n}" for a, n in cells))
    won = {r: {o["task_id"] for o in results[r]["outcomes"] if o["success"]} for r in rows}
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            print(f"{a} vs {b}: {len(won[a] & won[b])} both, {len(won[a] - won[b])} only {a}, "
                  f"{len(won[b] - won[a])} only {b}")


def trained_base(adapters: Path, data: Path) -> Path:
    """The base the adapters were trained on (their config names it), else the converted SmolLM2."""
    for cfg in sorted(adapters.glob("phase*/adapter_config.json")):
        model = Path(json.loads(cfg.read_text())["model"])
        if model.is_dir():
            return model
    found = sorted((data / "bases").glob("smollm2-135m-*"))
    if not found:
        sys.exit("no base model: run `uv run codeadapt make-base` first")
    return found[-1]


def _print(row: str, result: dict) -> None:
    s = result["summary"]
    parts = []
    for col in ("all", "held_out_files", "held_out_repos"):
        c = s[col]
        if c["n"]:
            parts.append(f"{col} {c['k']}/{c['n']} = {100 * c['success']:.1f}% "
                         f"[{100 * c['lo']:.1f}, {100 * c['hi']:.1f}]")
    a = s["all"]
    print(f"{row}: " + "; ".join(parts))
    print(f"    calls/task {a['calls_per_task'] or 0:.2f}, invalid-call rate "
          f"{a['invalid_call_rate'] or 0:.2f}, {a['seconds_per_task'] or 0:.1f} s/task, "
          f"wall {result['wall_s']:.0f} s (load {result['load_s']:.1f} s); failures {s['failures']}")
    if result.get("over_cap"):
        print(f"    {result['over_cap']} tasks expect an answer longer than agentic.max_tokens: "
              "no model can pass them")


if __name__ == "__main__":
    main()
