"""Benchmark (not a test): training tokens/s with mlx's bundled BLAS vs OpenBLAS on the tiny
base, and evaluation prompts/s sequential vs batched vs prefix-cached.

    uv run python scripts/bench_models.py --base data/bases/tiny-<hash>-pretrained [--data data/phase7]

Needs a built base and dataset (`uv run codeadapt run phase7` makes both). Each training runs
in the worker subprocess, the way the flows run it, with CODEADAPT_BLAS choosing the library.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from codeadapt.config import EvalSpec, TrainSpec
from codeadapt.worker import run_in_worker


def train_tps(base: Path, data: Path, blas: str, iters: int) -> tuple[float, str]:
    os.environ["CODEADAPT_BLAS"] = blas
    spec = TrainSpec(iters=iters, batch_size=8, max_seq_length=1024, learning_rate=5e-4,
                     steps_per_report=iters, steps_per_eval=iters + 1, val_batches=0, save_every=iters)
    with tempfile.TemporaryDirectory() as tmp:
        m = run_in_worker("train", {"base_dir": str(base), "data_dir": str(data),
                                    "out_dir": str(Path(tmp) / "a"), "spec": spec.model_dump()})
    return m["tokens_per_sec"], m["blas"]


def eval_pps(base: Path, data: Path, fixed: Path, batch: int, cache: bool,
             max_tokens: int) -> tuple[float, float, int]:
    os.environ["CODEADAPT_BLAS"] = "auto"
    spec = EvalSpec(max_tokens=max_tokens, batch_size=batch, prefix_cache=cache, run_tools=False)
    t = time.perf_counter()
    r = run_in_worker("eval", {"model_dir": str(base), "adapter_dir": None, "data_dir": str(data),
                               "repos_dir": str(data.parent / "repos"), "spec": spec.model_dump(),
                               "fixed_set": str(fixed)})
    return r["prompts"] / r["gen_s"], time.perf_counter() - t, r["prompts"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("data/phase7"))
    ap.add_argument("--fixed", type=Path, default=Path("data/eval/fixed.jsonl"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    for blas in ("reference", "auto"):
        tps, which = train_tps(args.base, args.data, blas, args.iters)
        print(f"LoRA training, batch 8, {args.iters} steps: {tps:8.1f} tokens/s  [{which}]")
    for batch, cache in ((1, False), (8, False), (1, True), (8, True)):
        pps, wall, n = eval_pps(args.base, args.data, args.fixed, batch, cache, args.max_tokens)
        print(f"eval {n} prompts, max_tokens {args.max_tokens}, batch {batch}, prefix cache "
              f"{'on ' if cache else 'off'}: {pps:5.2f} prompts/s (generation), {wall:5.1f} s wall")


if __name__ == "__main__":
    main()
