"""Benchmark (not a test): where LoRA training and evaluation time goes on the default base,
before/after each speed step, on the same data.

    uv run python scripts/bench_models.py [--base data/bases/smollm2-135m-<hash>] [--data data/phase7]

Training: the same length-sorted batches of the phase's train split, one optimizer step each
(value_and_grad + Adam, as mlx-lm's `train` does), timed per variant:
  full head      logits at every position, mlx's own attention/SiLU (the starting point)
  assistant head the output head only where an assistant token is the target (train.masked_loss)
  + fastpath     block-causal base-2 attention and SiLU (codeadapt.models.fastpath)
and LoRA on the top 8 vs all 30 blocks. Evaluation: prompts/s of the held-out prompts,
sequential with the prefix cache vs prefix-cached prefill + batched decode, with mlx's kernels
and with fastpath's for cached prompts (eval.fast_kernels), and how many outputs differ.
Each part runs in a child process with OpenBLAS preloaded (codeadapt.worker's environment).
Needs a dataset (`uv run codeadapt run phase7 --data-only`); converts the base if missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from codeadapt.worker import worker_env

CHILD = r'''
import json, sys, time
from pathlib import Path
import mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
from mlx_lm import load
from mlx_lm.tuner.utils import linear_to_lora_layers
from codeadapt import train as T
from codeadapt.models import fastpath
base, data, variant, layers, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
model, tok = load(base)
encs, _ = T.load_split(Path(data) / "train.jsonl", tok, 1024)
model.freeze()
linear_to_lora_layers(model, layers, {"rank": 16, "dropout": 0.0, "scale": 20.0})
opt = optim.Adam(learning_rate=1e-4)

def full_head(model, tokens, mask):
    logits = model(tokens[:, :-1])
    w = mask[:, 1:]
    return (nn.losses.cross_entropy(logits, tokens[:, 1:]) * w).sum() / w.sum(), w.sum()

if variant == "fastpath":
    fastpath.install()
loss = full_head if variant == "full" else T.masked_loss
vg = nn.value_and_grad(model, loss)
batches = T.epoch_batches([len(e.tokens) for e in encs], 4, 0, 0)[: steps + 1]
tokens = 0
seconds = 0.0
for i, b in enumerate(batches):
    tk, m = T.collate([encs[j] for j in b], 1024)
    batch = (mx.array(tk), mx.array(m)) if variant == "full" else T.to_batch(tk, m)
    t = time.perf_counter()
    (l, n), g = vg(model, *batch)
    opt.update(model, g)
    mx.eval(l, model.parameters(), opt.state)
    if i:  # the first step warms up
        seconds += time.perf_counter() - t
        tokens += sum(len(encs[j].tokens) for j in b)
print(json.dumps({"tokens_per_s": tokens / seconds, "steps": steps, "tokens": tokens}))
'''


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], env=worker_env(), check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def eval_pps(base: Path, data: Path, batch: int, conversations: int, max_tokens: int,
             fast: bool, adapter: Path | None) -> dict:
    from codeadapt.config import EvalSpec
    from codeadapt.worker import run_in_worker

    spec = EvalSpec(max_tokens=max_tokens, batch_size=batch, prefix_cache=True,
                    max_conversations=conversations, fast_kernels=fast)
    t = time.perf_counter()
    r = run_in_worker("eval", {"model_dir": str(base), "adapter_dir": str(adapter) if adapter else None,
                               "data_dir": str(data),
                               "repos_dir": str(data.parent / "repos"), "spec": spec.model_dump(),
                               "fixed_set": None})
    return {"prompts": r["prompts"], "pps": r["prompts"] / r["gen_s"],
            "wall": time.perf_counter() - t, "gen_tokens": r["generated_tokens"],
            "prefilled": r["prompt_tokens"] - r["reused_prompt_tokens"],
            "outputs": [x["output"] for x in r["results"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="model dir (default: convert/reuse SmolLM2)")
    ap.add_argument("--data", type=Path, default=Path("data/phase7"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--conversations", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--adapter", type=Path, help="evaluate with this adapter (default: the base)")
    ap.add_argument("--eval-only", action="store_true", help="skip the training variants")
    args = ap.parse_args()
    if args.base is None:
        from codeadapt.models import gguf

        args.base = gguf.make_base(args.data.parent / "bases")
    for variant, layers in () if args.eval_only else (("full", 8), ("assistant", 8), ("fastpath", 8),
                                                        ("fastpath", 30)):
        r = child([str(args.base), str(args.data), variant, str(layers), str(args.steps)])
        print(f"LoRA top {layers:2d}, {variant:9s} head/kernels, batch 4, {args.steps} steps: "
              f"{r['tokens_per_s']:6.1f} tokens/s", flush=True)
    who = args.adapter or "base model"
    same = None
    for batch, fast in ((1, False), (8, False), (8, True)):
        r = eval_pps(args.base, args.data, batch, args.conversations, args.max_tokens, fast, args.adapter)
        kernels = "fastpath" if fast else "mlx"
        print(f"eval {r['prompts']} prompts ({who}, max_tokens {args.max_tokens}), prefix cache, "
              f"batch {batch}, {kernels} kernels: {r['pps']:.2f} prompts/s, {r['prefilled']} tokens "
              f"prefilled, {r['gen_tokens']} generated, {r['wall']:.0f} s wall", flush=True)
        if same is not None:
            diff = sum(a != b for a, b in zip(same, r["outputs"]))
            print(f"  outputs differing from the previous line: {diff} of {r['prompts']}", flush=True)
        same = r["outputs"]


if __name__ == "__main__":
    main()
