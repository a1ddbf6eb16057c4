"""Benchmark (not a test): the data build at scale against tree-sitter's parse floor.

    uv run python scripts/bench_scale.py                       # 10, 100 and 1000 sources, threads
    uv run python scripts/bench_scale.py --sets 1000 --dask 1,2,4
    uv run python scripts/bench_scale.py --sets 100 --warm     # + a second run on the same inputs

Source sets, all installed distributions of this environment (no network):
  10    the ten `popular` projects of pipeline.toml's offline profile
  100   the 100 distributions with the most Python (transformers, prefect, numpy, ...)
  1000  a simulation: the 100 smallest distributions with 3+ .py files, each replicated ten
        times under new names (so 1,000 snapshots, 1,000 checkouts, 4,000 task runs)

Each build runs cold in a fresh process (empty repos, result storage and Prefect database),
as `codeadapt run phase5 --data-only` would with a config whose phase5 is the set. It
prints: the parse+extract floor on the same files (one core, and ideal on all cores), wall per
stage (first start to last end of its task runs), MB/s, examples/s, wall / floor, the slowest
source's example generation and its share of that stage, the worst source's seconds per MB
against the median, and peak RSS (flow process; Dask workers separately).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PER_SOURCE = {"grep": 25, "read": 15, "explain": 10}  # ~ what the 100-source build of issue 11 made


def py_sizes() -> dict[str, tuple[int, int]]:
    """Installed distribution -> (bytes of .py, number of .py files)."""
    out = {}
    for d in md.distributions():
        name = d.metadata["Name"]
        size = n = 0
        for f in d.files or []:
            if f.suffix == ".py" and "__pycache__" not in f.parts and not f.as_posix().startswith(".."):
                try:
                    size += f.locate().stat().st_size
                    n += 1
                except OSError:
                    pass
        if n and name.lower() != "codeadapt":
            out[name] = (size, n)
    return out


def source_set(which: str) -> dict[str, str]:
    """Source name -> distribution."""
    if which == "10":
        cfg = tomllib.loads((ROOT / "pipeline.toml").read_text())
        srcs = cfg["profiles"]["offline"]["sources"]
        return {n: s["dist"] for n, s in srcs.items() if s.get("group") == "popular"}
    sizes = py_sizes()
    if which == "100":
        top = sorted(sizes, key=lambda d: -sizes[d][0])[:100]
        return {_slug(d): d for d in top}
    small = sorted((d for d in sizes if sizes[d][1] >= 3), key=lambda d: sizes[d][0])[:100]
    return {f"{_slug(d)}-r{i}": d for i in range(10) for d in small}


def _slug(dist: str) -> str:
    return dist.lower().replace(".", "-").replace("_", "-")


def write_config(tmp: Path, sources: dict[str, str], runner: str, workers: int) -> Path:
    n = len(sources)
    budget = ", ".join(f"{k} = {v * n}" for k, v in PER_SOURCE.items())
    lines = [
        'profile = "offline"', "seed = 0",
        "[paths]", f'data = "{tmp / "data"}"', f'repos = "{tmp / "data" / "repos"}"',
        f'adapters = "{tmp / "adapters"}"',
        "[groups.scale]", f"budget = {{ {budget} }}",
        "[phases.phase5]", 'groups = ["scale"]',
        "[runner]", f'kind = "{runner}"', f"n_workers = {workers}",
    ]
    for name, dist in sources.items():
        lines += [f'[sources."{name}"]', 'kind = "installed"', f'dist = "{dist}"', 'group = "scale"']
    path = tmp / "scale.toml"
    path.write_text("\n".join(lines) + "\n")
    bases = ROOT / "data" / "bases"
    if bases.is_dir():  # the converted SmolLM2 (its tokenizer sets the token budget): reuse it
        (tmp / "data").mkdir(parents=True, exist_ok=True)
        (tmp / "data" / "bases").symlink_to(bases)
    return path


def one_build(config: Path) -> dict:
    """In this (fresh) process: run the flow, then read its task runs from the server."""
    from prefect.client.orchestration import get_client

    from codeadapt.config import load_settings
    from flows.phase import PHASE_FLOWS
    from flows.runners import task_runner

    settings = load_settings(str(config))
    tic = time.perf_counter()
    with get_client(sync_client=True) as client:  # starts the temporary server, kept for the flow
        client.hello()
    server_s = time.perf_counter() - tic
    if settings.runner.kind == "dask":
        from flows.runners import share_temporary_server

        share_temporary_server()  # the workers report to this server, not temporary ones of their own
    flow = PHASE_FLOWS["phase5"].with_options(task_runner=task_runner(settings.runner))
    tic = time.perf_counter()
    state = flow(config=str(config), models=False, return_state=True)
    wall = time.perf_counter() - tic
    result = state.result()
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    only = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    runs: list = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_task_runs(flow_run_filter=only, limit=200, offset=len(runs))
            runs += page
            if len(page) < 200:
                break
    tasks = [{"name": r.name, "start": r.start_time.timestamp() if r.start_time else None,
              "end": r.end_time.timestamp() if r.end_time else None,
              "seconds": r.total_run_time.total_seconds(), "state": r.state_name}
             for r in runs]
    counts = result["phase5"]["counts"]
    data = Path(settings.resolve(settings.paths.data)) / "phase5"
    digest = hashlib.sha256(b"".join((data / f"{s}.jsonl").read_bytes() for s in ("train", "valid", "test")))
    return {"wall_s": wall, "outputs_sha256": digest.hexdigest()[:16], "tasks": tasks, "examples": counts["split"], "failed": result["phase5"]["failed_sources"],
            "server_s": server_s}


def floor(repos: Path) -> dict:
    """tree-sitter parse + extract of every .py file of the checkouts, one core; then each
    source's example generation alone (CPU seconds, same quotas), for the cost per MB."""
    from codeadapt import examples, extract
    from codeadapt.extract import extract_file

    blobs = [(p.relative_to(repos).as_posix(), p.read_bytes()) for p in sorted(repos.rglob("*.py"))
             if ".git" not in p.relative_to(repos).parts and p.is_file() and not p.is_symlink()]
    tic = time.process_time()
    for rel, b in blobs:
        extract_file(b, rel)
    core_s = time.process_time() - tic
    del blobs
    limits = examples.Limits(40, 20, (0.1, 0.15, "codeadapt-split-v1"))
    gen, made = {}, {}
    for d in sorted(repos.iterdir()):
        if (d / ".git").is_dir():
            ext = extract.extract_checkout(d, d.name, "0" * 40)
            tic = time.process_time()
            made[d.name] = len(examples.python_examples(d, ext, PER_SOURCE, limits, "0")[0])
            gen[d.name] = time.process_time() - tic
    return {"core_s": core_s, "gen_s": gen, "gen_n": made,
            "files": sum(1 for p in repos.rglob("*.py") if ".git" not in p.relative_to(repos).parts),
            "mb": sum(p.stat().st_size for p in repos.rglob("*.py")
                      if ".git" not in p.relative_to(repos).parts and p.is_file() and not p.is_symlink()) / 1e6}


def source_mb(repos: Path) -> dict[str, float]:
    out = {}
    for d in repos.iterdir():
        if not (d / ".git").is_dir():
            continue
        out[d.name] = sum(p.stat().st_size for p in d.rglob("*.py") if ".git" not in p.relative_to(d).parts
                          and p.is_file() and not p.is_symlink()) / 1e6
    return out


def child(mode: str, arg: str) -> dict:
    """Run `mode` in a fresh process; sample its memory (and its descendants') every 0.2 s."""
    import psutil

    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, f"--{mode}", arg], env=env, cwd=ROOT,
                                stdout=out, stderr=err, text=True)
        me, peak_self, peak_all, peak_pss, at_peak = psutil.Process(proc.pid), 0, 0, 0, []
        while proc.poll() is None:
            try:
                procs = [me] + me.children(recursive=True)
            except psutil.Error:
                procs = []
            rss, pss, own = [], 0, 0
            for k in procs:
                try:
                    if k.name() != "git":
                        rss.append((k.memory_info().rss, _label(k)))
                        pss += _pss(k.pid)
                        own = rss[-1][0] if k is me else own
                except psutil.Error:  # exited (or a zombie) since the listing
                    continue
            total = sum(r for r, _ in rss)
            peak_self, peak_pss = max(peak_self, own), max(peak_pss, pss)
            if total > peak_all:
                peak_all, at_peak = total, sorted(rss, reverse=True)
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            sys.exit(f"{mode} {arg} failed:\n{err.read()[-3000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    return {**result, "peak_self_mb": peak_self / 2**20, "peak_all_mb": peak_all / 2**20,
            "peak_pss_mb": peak_pss / 2**20,
            "at_peak": [f"{label} {r / 2**20:.0f}" for r, label in at_peak]}


def _pss(pid: int) -> int:
    """Proportional set size in bytes: shared pages (libraries, pages a forked worker still
    shares with its parent) divided among the processes that map them, so a sum over
    processes counts each page once; an RSS sum counts a shared page in every process."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m[1]) * 1024 if m else 0


def _label(p) -> str:
    """A short name for a sampled process: the module or script it runs."""
    cmd = p.cmdline()
    if "-c" in cmd:  # multiprocessing's children: python [flags] -c "from multiprocessing..."
        code = cmd[cmd.index("-c") + 1] if cmd.index("-c") + 1 < len(cmd) else ""
        return next((n for n in ("resource_tracker", "forkserver", "spawn_main") if n in code), "python -c")
    mod = next((cmd[i + 1] for i, c in enumerate(cmd[:-1]) if c == "-m"), None)
    script = next((c for c in cmd[1:] if not c.startswith("-")), None)
    return mod or (Path(script).name if script else p.name())


STAGES = {"sync": "sync_repo", "base": "make_base", "extract": "extract_repo",
          "examples": ("make_examples", "html_examples"), "dataset": "build_dataset"}


def summarize(label: str, run: dict, fl: dict, mbs: dict[str, float]) -> dict:
    cores = os.cpu_count() or 1
    ideal = fl["core_s"] / cores
    print(f"\n== {label}: {len(mbs)} sources, {fl['files']} .py files, {fl['mb']:.1f} MB")
    print(f"floor (tree-sitter parse + extract): {fl['core_s']:.1f} s on one core, {ideal:.1f} s ideal on {cores}")
    t0 = min((t["start"] for t in run["tasks"] if t["start"]), default=0)
    for stage, prefix in STAGES.items():
        ts = [t for t in run["tasks"] if t["name"].startswith(prefix) and t["start"] and t["end"]]
        if ts:
            first, last = min(t["start"] for t in ts) - t0, max(t["end"] for t in ts) - t0
            busy = sum(t["seconds"] for t in ts)
            print(f"  {stage:9s} {first:6.1f} s -> {last:6.1f} s   wall {last - first:6.1f} s   "
                  f"task time {busy:7.1f} s   ({len(ts)} task runs)")
    n_ex = sum(run["examples"].values())
    print(f"flow wall {run['wall_s']:.1f} s: {fl['mb'] / run['wall_s']:.2f} MB/s, {n_ex / run['wall_s']:.1f} examples/s "
          f"({n_ex} examples), {run['wall_s'] / ideal:.1f}x the floor on {cores} cores "
          f"({run['wall_s'] / fl['core_s']:.1f}x one core)")
    gen = fl["gen_s"]  # each source's example generation alone, CPU seconds
    if gen:
        slow = max(gen, key=gen.get)
        print(f"example generation alone (CPU): total {sum(gen.values()):.1f} s, median source "
              f"{statistics.median(gen.values()):.2f} s, slowest {slow} {gen[slow]:.1f} s ({mbs.get(slow, 0):.1f} MB)")
        for floor_mb in (0.05, 0.5):
            per_mb = {s: gen[s] / mbs[s] for s in gen if mbs.get(s, 0) > floor_mb}
            if per_mb:
                med = statistics.median(per_mb.values())
                worst = max(per_mb, key=per_mb.get)
                print(f"  seconds per MB, sources > {floor_mb:g} MB ({len(per_mb)}): median {med:.2f}, "
                      f"worst {worst} {per_mb[worst]:.2f} = {per_mb[worst] / med:.1f}x the median")
    if fl.get("gen_n"):
        buckets = [(0, 0.1), (0.1, 1), (1, 10), (10, 1e9)]
        parts = []
        for lo, hi in buckets:
            per = [gen[n] / fl["gen_n"][n] * 1e3 for n in gen if lo <= mbs.get(n, 0) < hi and fl["gen_n"][n]]
            if per:
                parts.append(f"{lo:g}-{hi:g} MB: {statistics.median(per):.1f} ({len(per)})".replace("-1e+09", "+"))
        print("  ms per example (median) by source size: " + ", ".join(parts))
    print(f"peak RSS: flow process {run['peak_self_mb']:.0f} MB; with its Prefect server and workers "
          f"{run['peak_all_mb']:.0f} MB (sampled every 0.2 s, git excluded); Prefect server start "
          f"{run['server_s']:.1f} s (not in the flow wall); failed sources: {len(run['failed'])}")
    print(f"  at that peak, MB per process: {', '.join(run['at_peak'])}; peak of the summed PSS "
          f"(each shared page counted once) {run['peak_pss_mb']:.0f} MB")
    print(f"dataset files sha256: {run['outputs_sha256']}")
    return {"label": label, "wall_s": run["wall_s"], "floor_core_s": fl["core_s"], "examples": n_ex,
            "sha": run["outputs_sha256"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="10,100,1000")
    ap.add_argument("--dask", default="", help="also run the LAST set on a Dask LocalCluster of these worker counts")
    ap.add_argument("--warm", action="store_true", help="re-run each threads build on the same store")
    ap.add_argument("--no-threads", action="store_true", help="only the Dask runs")
    ap.add_argument("--build", help=argparse.SUPPRESS)
    ap.add_argument("--floor", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        os.environ["PREFECT_HOME"] = str(Path(args.build).parent / "prefect-home")
        os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(Path(args.build).parent / "results")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a fresh database
        print(json.dumps(one_build(Path(args.build))))
        return
    if args.floor:
        print(json.dumps(floor(Path(args.floor))))
        return
    sets = args.sets.split(",")
    runs = [(s, "threads", 8) for s in sets if not args.no_threads] + [(sets[-1], "dask", int(w)) for w in args.dask.split(",") if w]
    results = []
    for which, runner, workers in runs:
        with tempfile.TemporaryDirectory(prefix=f"scale{which}-") as tmp:
            cfg = write_config(Path(tmp), source_set(which), runner, workers)
            label = f"{which} sources, {runner}" + (f" ({workers} workers)" if runner == "dask" else "")
            run = child("build", str(cfg))
            repos = Path(tmp) / "data" / "repos"
            fl = child("floor", str(repos))
            results.append(summarize(label, run, fl, source_mb(repos)))
            if args.warm and runner == "threads":
                warm = child("build", str(cfg))
                per = [t for t in warm["tasks"] if t["name"].startswith(("extract_repo", "make_examples"))]
                hits = sum(1 for t in per if t["state"] == "Cached")
                print(f"warm re-run: flow wall {warm['wall_s']:.1f} s; cache hits {hits}/{len(per)} "
                      f"extract/example task runs")
    dask = [r for r in results if "dask" in r["label"]]
    if dask:
        print("\nDask LocalCluster wall ratios (to 1 worker): " + ", ".join(
            f"{r['label']}: {r['wall_s'] / dask[0]['wall_s']:.2f}" for r in dask))
        same = len({r["sha"] for r in results if r["label"].startswith(sets[-1] + " ")}) == 1
        print("datasets identical across runners and worker counts: " + ("yes" if same else "NO"))


if __name__ == "__main__":
    main()
