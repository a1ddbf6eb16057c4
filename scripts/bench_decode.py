"""Benchmark (not a test): where one batched decode step of the converted SmolLM2 goes on this
CPU — the whole step against its matmuls (output head, the 30 MLPs, the 30 q/k/v/o
projections) timed alone; the rest is attention over the KV cache, norms, RoPE and overhead.

    uv run python scripts/bench_decode.py [--fast]    # --fast: codeadapt's eval kernels

Run it with Debian's OpenBLAS preloaded, as the training and evaluation workers run
(`LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 uv run python
scripts/bench_decode.py`), or the numbers are the bundled BLAS's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _ms(fn, n: int = 10) -> float:
    import mlx.core as mx

    mx.eval(fn())
    tic = time.perf_counter()
    for _ in range(n):
        mx.eval(fn())
    return (time.perf_counter() - tic) / n * 1000


def main() -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from codeadapt.models import fastpath

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="install codeadapt's cached-path kernels first")
    ap.add_argument("--rows", default="1,8,16")
    ap.add_argument("--lengths", default="200,1000", help="cached tokens per row")
    args = ap.parse_args()
    bases = sorted((ROOT / "data" / "bases").glob("smollm2-135m-*"))
    if not bases:
        sys.exit("no converted SmolLM2 under data/bases: run `uv run codeadapt make-base` first")
    if args.fast:
        fastpath.install(cached=True)
    model, _ = load(str(bases[-1]))
    layer, hidden = model.model.layers[0], model.args.hidden_size
    attn = layer.self_attn
    for b in map(int, args.rows.split(",")):
        for n in map(int, args.lengths.split(",")):
            cache = make_prompt_cache(model)
            mx.eval(model(mx.random.randint(0, 1000, (b, n)), cache=cache))
            tok = mx.random.randint(0, 1000, (b, 1))

            def step(cache=cache, tok=tok):
                out = model(tok, cache=cache)
                for c in cache:  # the same cached length every time
                    c.offset -= 1
                return out

            h = mx.random.normal((b, 1, hidden))
            full = _ms(step)
            head = _ms(lambda h=h: model.model.embed_tokens.as_linear(h))
            mlp = len(model.model.layers) * _ms(lambda h=h: layer.mlp(h))
            proj = len(model.model.layers) * _ms(
                lambda h=h: [attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), attn.o_proj(h)])
            print(f"rows {b:2d} x {n:4d} cached: step {full:6.1f} ms | head {head:5.1f} | MLPs {mlp:5.1f} "
                  f"| q/k/v/o {proj:5.1f} | rest (KV attention, norms, RoPE, overhead) "
                  f"{full - head - mlp - proj:6.1f}", flush=True)


if __name__ == "__main__":
    main()
