"""Diagnosis (not a test): train a phase's chain (phase5 → 6 → 7) on the data as built now,
under new adapter names, without Prefect and without the turn-level evaluations — to compare
two generator versions on the same base and settings.

    uv run codeadapt run phase7 --data-only
    uv run python scripts/train_chain.py --prefix v9-
    uv run python scripts/score_agentic.py --rows rules,v9-phase7 --tasks 100
    # one phase from the base, with other settings (pipeline.toml keys, as `codeadapt --set`):
    uv run python scripts/train_chain.py --prefix e3- --only --set phases.phase7.train_iters=450

Each phase trains with the pipeline's `train_in_worker` and `[train]` settings (the phase's
step count), from the previous phase's adapter when `continue_chain` is set, as the flow does;
the adapters land in `adapters/<prefix><phase>` (the flow's own adapters are not touched).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> None:
    from score_agentic import trained_base

    from codeadapt.config import load_settings
    from codeadapt.train import train_in_worker

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", default="phase7", help="the last phase of the chain")
    ap.add_argument("--prefix", required=True, help="adapter names: adapters/<prefix><phase>")
    ap.add_argument("--only", action="store_true",
                    help="train the last phase alone, from the base (not its chain)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a pipeline.toml key, e.g. train.learning_rate=1e-4")
    args = ap.parse_args()
    if not args.prefix.strip("-_."):
        sys.exit("--prefix must name something: the flow's own adapters are not overwritten")

    settings = load_settings(ROOT / "pipeline.toml", overrides=args.set)
    data, adapters = settings.resolve(settings.paths.data), settings.resolve(settings.paths.adapters)
    base = trained_base(adapters, data)
    prev = None
    for phase in [args.phase] if args.only else settings.phase_chain(args.phase):
        spec = settings.train_spec(phase)
        init = prev if spec.continue_chain and spec.mode == "lora" else None
        out = adapters / f"{args.prefix}{phase}"
        tic = time.perf_counter()
        m = train_in_worker(base, data / phase, out, spec, None, init,
                            frozen_store=data / "cache" / "frozen")
        print(f"{out.name}: {spec.iters} steps from {init.name if init else 'the base'} in "
              f"{time.perf_counter() - tic:.0f} s, {m['tokens_per_sec']:.0f} tokens/s, "
              f"final train loss {m['train_losses'][-1]['loss']:.3f}; frozen cache "
              f"{m.get('frozen_cache')}", flush=True)
        prev = out


if __name__ == "__main__":
    main()
