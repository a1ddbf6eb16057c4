"""Diagnosis (not a test): how well does a model predict the final answers that quote code
right after a tool result ("show X"), teacher-forced — the gold conversation up to the
answer, then each answer token given the ones before it? Compares answers it trained on
with held-out ones: a model that copies from the tool result scores alike on both; one that
memorised its training answers does not. Only answers that follow a tool result count: a
hand-written direct answer with a code fence has nothing to copy (stop 27: counting 5 of
them made v9's held-out figure 73.3% instead of 96.7%).

    uv run python scripts/probe_answers.py --adapter phase7 --split test --n 20
    uv run python scripts/probe_answers.py --adapter none --split test   # the base alone

Prints the mean cross-entropy and the share of answer tokens that are the model's top
prediction, and where the first wrong token falls in each answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="a name under adapters/, or none")
    ap.add_argument("--phase", default="phase7")
    ap.add_argument("--split", default="test", choices=("train", "valid", "test"))
    ap.add_argument("--n", type=int, default=20, help="answers to score (first in file order)")
    args = ap.parse_args()

    from codeadapt.worker import worker_env

    env = worker_env()
    if env.get("LD_PRELOAD") and os.environ.get("LD_PRELOAD") != env["LD_PRELOAD"]:
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # the fast BLAS, as the workers

    import mlx.core as mx
    import mlx.nn as nn
    import mlx_lm
    import numpy as np
    from mlx_lm.tuner.utils import load_adapters
    from score_agentic import trained_base

    from codeadapt.config import load_settings
    from codeadapt.train import encode_record

    settings = load_settings(ROOT / "pipeline.toml")
    data, adapters = settings.resolve(settings.paths.data), settings.resolve(settings.paths.adapters)
    model, tok = mlx_lm.load(str(trained_base(adapters, data)))
    if args.adapter != "none":
        model = load_adapters(model, str(adapters / args.adapter))
    model.eval()
    lines = (data / args.phase / f"{args.split}.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "```" in r["messages"][-1]["content"]
               and r["messages"][-2]["role"] == "tool"][: args.n]
    total = right = 0
    ce_sum, first_wrong = 0.0, []
    for r in records:
        full = encode_record(tok, r, args.split).tokens
        prompt = tok.apply_chat_template(r["messages"][:-1], tools=r.get("tools"),
                                         add_generation_prompt=True, return_dict=False)
        logits = model(mx.array(full[None, :-1]))[0][len(prompt) - 1:]
        targets = mx.array(full[len(prompt):])
        ok = np.array(mx.argmax(logits, axis=-1) == targets)
        ce_sum += float(nn.losses.cross_entropy(logits, targets).sum())
        total, right = total + len(ok), right + int(ok.sum())
        first_wrong.append(int(np.flatnonzero(~ok)[0]) if (~ok).any() else None)
    print(f"{args.adapter} on {len(records)} {args.split} answers ({total} tokens): mean CE "
          f"{ce_sum / total:.3f}, top-1 token accuracy {right / total:.3f}; first wrong token at "
          f"{first_wrong}")


if __name__ == "__main__":
    main()
