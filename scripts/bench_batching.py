"""Benchmark (not a test): the default run's turn-evaluation prompts through the batched decode,
by batch size and by how rows are admitted (in queue order, or least padding first from a
pool of prefilled prompts), with the same greedy outputs checked across variants.

    uv run python scripts/bench_batching.py [--adapter adapters/phase7|none] [--variants 8:1,8,16,32]
                                           [--save before.json | --compare before.json]

A variant is `batch[:lookahead]` (lookahead 1 = admit in queue order, the stop-28 behaviour;
default = the batch size). Prints per variant: seconds, of which prefill and decode steps, the
steps' mean rows and padded cache length, and the share of cached positions that were
padding. Runs in the evaluation worker's environment (OpenBLAS preloaded) and needs the
phase-7 data (`uv run codeadapt run phase7 --data-only`) and a converted base.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r'''
import collections, importlib, json, sys, time
from pathlib import Path
from codeadapt.config import load_settings
from codeadapt.models import generate as gm
from codeadapt.prompts import eval_prompts
adapter, batch, ahead = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = load_settings(Path("pipeline.toml"))
paths = {k: s.resolve(getattr(s.paths, k)) for k in ("data", "repos")}
held = paths["data"] / s.eval.held_out_phase if s.eval.held_out_phase else None
fixed = s.resolve(Path(s.eval.fixed_set)) if s.eval.fixed_set else None
prompts = eval_prompts(s.eval, paths["data"] / "phase7", paths["repos"], fixed, held)
base = sorted((paths["data"] / "bases").glob("smollm2-135m-*"))[-1]
model, tok, _, _ = gm.load_for_generation(base, None if adapter == "none" else Path(adapter),
                                          s.eval.fast_kernels)
G = importlib.import_module("mlx_lm.generate")
t = collections.Counter()
steps = []
step = G.GenerationBatch._step
def timed_step(self):
    c = self.prompt_cache[0]
    tic = time.perf_counter(); r = step(self); t["decode"] += time.perf_counter() - tic
    steps.append((len(self.uids), c._idx, int(c.left_padding.sum().item())))
    return r
G.GenerationBatch._step = timed_step
prefill = gm._prefill
def timed_prefill(*a, **kw):
    tic = time.perf_counter(); prefill(*a, **kw); t["prefill"] += time.perf_counter() - tic
gm._prefill = timed_prefill
ids = [gm.prompt_ids(tok, p) for p in prompts]
tic = time.perf_counter()
outs, _ = gm._batched(model, tok, ids, s.eval.max_tokens, batch, True, lookahead=ahead)
wall = time.perf_counter() - tic
cells = sum(r * n for r, n, _ in steps)
print(json.dumps({"prompts": len(ids), "seconds": wall, "prefill": t["prefill"], "decode": t["decode"],
                  "steps": len(steps), "rows": sum(r for r, _, _ in steps) / len(steps),
                  "padded": sum(n for _, n, _ in steps) / len(steps),
                  "padding": sum(p for _, _, p in steps) / cells, "outputs": outs}))
'''


def main() -> None:
    from codeadapt.worker import worker_env

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default="adapters/phase7", help="adapter dir, or none for the base")
    ap.add_argument("--variants", default="8:1,8,16,32")
    ap.add_argument("--save", type=Path, help="write the first variant's outputs here (JSON)")
    ap.add_argument("--compare", type=Path, help="count outputs differing from a --save file")
    args = ap.parse_args()
    first = json.loads(args.compare.read_text()) if args.compare else None
    for v in args.variants.split(","):
        batch, _, ahead = v.partition(":")
        out = subprocess.run([sys.executable, "-c", CHILD, args.adapter, batch, ahead or batch],
                             cwd=ROOT, env=worker_env(), check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        same = "" if first is None else f", outputs differing from the first: {sum(a != b for a, b in zip(first, r['outputs']))}"
        if args.save and first is None:
            args.save.write_text(json.dumps(r["outputs"]))
        first = first or r["outputs"]
        print(f"batch {batch:>2} lookahead {ahead or batch:>2}: {r['prompts']} prompts in {r['seconds']:.1f} s "
              f"(prefill {r['prefill']:.1f}, decode steps {r['decode']:.1f}; {r['steps']} steps, "
              f"{r['rows']:.1f} rows of {r['padded']:.0f} cached positions, {r['padding']:.0%} padding){same}",
              flush=True)


if __name__ == "__main__":
    main()
