"""Diagnosis (not a test): train one variant of a phase and score it on the run's prompts.

    uv run python scripts/ablate_phase.py NAME --data phase6 --init phase6 --lr 3e-4 --iters 40
    uv run python scripts/ablate_phase.py seed1 --data phase7 --init phase6 --seed 1

Trains a LoRA adapter on `data/<data>` (optionally continuing from `adapters/<init>`) with the
pipeline's [train] options except the ones given, into `adapters/.ablations/NAME`, then runs
the same turn evaluation as `codeadapt run` (the final phase's prompts, held-out repositories,
fixed set; `--phase`) and prints tool-call accuracy with its interval and the failures of call
turns by expected tool. This is how the phase-7 regression in the README was traced.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from codeadapt.config import load_settings
    from codeadapt.models.gguf import SMOLLM2
    from codeadapt.train import train_in_worker
    from codeadapt.worker import run_in_worker

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--data", help="dataset to train on (a phase name)")
    ap.add_argument("--score", help="score this trained adapter (a phase name under adapters/) "
                    "instead of training one")
    ap.add_argument("--init", help="adapter to continue from (a phase name under adapters/)")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--iters", type=int)
    ap.add_argument("--seed", type=int, help="training seed (batch order, LoRA init): how much "
                    "a score moves between trainings that differ only in it")
    ap.add_argument("--mix", type=float, help="train.mix_exponent (codeadapt.mixing)")
    ap.add_argument("--call-weight", type=float, help="train.call_weight")
    ap.add_argument("--phase", default="phase7", help="whose evaluation prompts to score on")
    ap.add_argument("--no-eval", action="store_true", help="train only (a step of a chain whose "
                    "last adapter is the one to score)")
    args = ap.parse_args()
    s = load_settings(ROOT / "pipeline.toml")
    data, adapters = s.resolve(s.paths.data), s.resolve(s.paths.adapters)
    if s.base_model() != SMOLLM2:
        raise SystemExit(f"base.model = {s.base_model()!r}: this script expects the default SmolLM2 base")
    bases = sorted((data / "bases").glob("smollm2-135m-*"))
    if not bases:
        raise SystemExit(f"no converted SmolLM2 under {data / 'bases'}: run `codeadapt run phase7` first")
    held = data / s.eval.held_out_phase if s.eval.held_out_phase else None
    if held is not None and not (held / "manifest.json").is_file():
        raise SystemExit(f"no dataset at {held} (the held-out repositories): `codeadapt run "
                         "phase7 --data-only` builds it")
    update = {k: v for k, v in (("learning_rate", args.lr), ("iters", args.iters), ("seed", args.seed),
                                ("mix_exponent", args.mix), ("call_weight", args.call_weight))
              if v is not None}
    # the phase's own step count (phases.*.train_iters) when --data names a phase
    spec = (s.train_spec(args.data) if args.data in s.phases else s.train).model_copy(update=update)
    if (args.score is None) == (args.data is None):
        raise SystemExit("give --data (train a variant) or --score (an existing adapter)")
    out = adapters / ".ablations" / args.name
    if args.score:
        out.mkdir(parents=True, exist_ok=True)
        for f in ("adapters.safetensors", "adapter_config.json"):
            (out / f).write_bytes((adapters / args.score / f).read_bytes())
    else:
        tic = time.time()
        m = train_in_worker(bases[-1], data / args.data, out, spec, None,
                            adapters / args.init if args.init else None,
                            frozen_store=data / "cache" / "frozen")
        print(f"{args.name}: trained {time.time() - tic:.0f} s, {m.get('tokens_per_sec')} "
              f"tokens/s, final valid loss {m.get('final_valid_loss')}", flush=True)
        if args.no_eval:
            return
    payload = {"model_dir": str(bases[-1]), "adapter_dir": str(out), "data_dir": str(data / args.phase),
               "prefill_store": str(data / "cache" / "prefill"),
               "repos_dir": str(s.resolve(s.paths.repos)), "spec": s.eval.model_dump(),
               "fixed_set": str(s.resolve(s.eval.fixed_set)) if s.eval.fixed_set else None,
               "held_out_dir": str(held) if held else None}
    r = run_in_worker("eval", payload)
    (out / "eval.json").write_text(json.dumps(r))
    tc = r["metrics"]["tool_call"]
    print(f"{args.name}: tool-call accuracy {tc['k']}/{tc['n']} = {100 * tc['accuracy']:.1f}% "
          f"[{100 * tc['lo']:.1f}, {100 * tc['hi']:.1f}]")
    calls = [x for x in r["results"] if x["expected"].get("name")]
    by = collections.Counter((x["expected"]["name"], x["score"]["failure"] or "ok") for x in calls)
    for (tool, why), n in sorted(by.items()):
        print(f"  expected {tool:9s} {why:10s} {n}")
    for label, keep in (("html", lambda x: x["source"] == "html"),
                        ("held-out repositories", lambda x: x["held_out"]),
                        ("other python", lambda x: x["source"] != "html" and not x["held_out"])):
        part = [x for x in calls if keep(x)]
        ok = sum(bool(x["score"]["correct"]) for x in part)
        print(f"  {label:22s} calls {ok}/{len(part)}")


if __name__ == "__main__":
    main()
