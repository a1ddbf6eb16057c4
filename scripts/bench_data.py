"""Benchmark (not a test): wall time of the phase-7 data build, cold and warm, and the
tree-sitter parse-only time for the same Python files.

    uv run python scripts/bench_data.py [--phase phase7]

Cold: empty repos dir, empty Prefect result storage. Warm: the same again (snapshots
unchanged, per-source tasks hit the cache). Each run goes through the real CLI and so
includes starting Prefect's temporary server; that start-up is measured on its own too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(phase: str, data: Path, results: Path) -> float:
    env = {**os.environ, "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(results),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    cmd = [sys.executable, "-m", "codeadapt.cli", "run", phase, "--data-only",
           "--set", f"paths.data='{data}'", "--set", f"paths.repos='{data / 'repos'}'",
           "--set", "eval.held_out_phase=''"]  # the phase's own data, as before --data-only built both
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def server_startup() -> float:
    code = "from prefect import flow\n@flow\ndef f(): return 1\nf()\n"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   env={**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    return time.perf_counter() - t


def parse_only(repos: Path) -> tuple[float, float, int, int]:
    import tree_sitter_python
    from tree_sitter import Language, Parser

    from codeadapt.extract import extract_file

    files = [p for p in sorted(repos.rglob("*.py")) if ".git" not in p.parts and (repos / "html") not in p.parents]
    blobs = [(p.relative_to(repos).as_posix(), p.read_bytes()) for p in files]
    parser = Parser(Language(tree_sitter_python.language()))
    t = time.perf_counter()
    for _, b in blobs:
        parser.parse(b)
    parse = time.perf_counter() - t
    t = time.perf_counter()
    for rel, b in blobs:
        extract_file(b, rel)
    full = time.perf_counter() - t
    return parse, full, len(blobs), sum(len(b) for _, b in blobs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", default="phase7")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, results = Path(tmp) / "data", Path(tmp) / "results"
        startup = server_startup()
        cold = run_cli(args.phase, data, results)
        warm = run_cli(args.phase, data, results)
        parse, full, n, size = parse_only(data / "repos")
    print(f"prefect temporary server + empty flow: {startup:6.1f} s")
    print(f"{args.phase} data build, cold:          {cold:6.1f} s (wall, CLI)")
    print(f"{args.phase} data build, warm caches:   {warm:6.1f} s (wall, CLI)")
    print(f"tree-sitter parse only: {parse:6.2f} s for {n} files, {size / 1e6:.1f} MB "
          f"({size / 1e6 / parse:.1f} MB/s); parse + extract: {full:6.2f} s ({size / 1e6 / full:.1f} MB/s)")


if __name__ == "__main__":
    main()
