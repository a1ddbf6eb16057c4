"""`codeadapt` command line: run phases, inspect config."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

OFFLINE_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def _prefect_env(config: str) -> None:
    """Defaults set before Prefect is imported: no telemetry, results under the project."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    root = Path(config).resolve().parent
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(root / "data" / "cache" / "results"))
    if "PREFECT_API_AUTH_STRING" not in os.environ:  # pointed at the project's stack: its password
        from codeadapt import stack

        auth = stack.auth_for(os.environ.get("PREFECT_API_URL"))
        if auth:
            os.environ["PREFECT_API_AUTH_STRING"] = auth


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="pipeline.toml", help="pipeline config file (default: %(default)s)")
    p.add_argument("--profile", default=None, help="profile from the config: offline (default) or github")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. groups.popular.budget.grep=50 (repeatable)")


def cmd_run(args: argparse.Namespace) -> int:
    from codeadapt.config import load_settings

    if args.runner:
        args.overrides.append(f"runner.kind={json.dumps(args.runner)}")
    if args.dask_address:
        args.overrides += ['runner.kind="dask"', f"runner.address={json.dumps(args.dask_address)}"]
    settings = load_settings(args.config, profile=args.profile, overrides=args.overrides)  # fail before Prefect starts
    _prefect_env(args.config)
    from flows.phase import PHASE_FLOWS
    from flows.runners import task_runner

    if args.phase not in PHASE_FLOWS:
        print(f"unknown phase {args.phase!r}; choose from {sorted(PHASE_FLOWS)}", file=sys.stderr)
        return 2
    if settings.runner.kind == "dask" and not settings.runner.address:
        from flows.runners import share_temporary_server

        share_temporary_server()  # a local cluster's workers report to this run's server
    flow = PHASE_FLOWS[args.phase].with_options(task_runner=task_runner(settings.runner))
    result = flow(config=args.config, profile=args.profile, overrides=args.overrides,
                  models=not args.data_only, held_out_data=args.data_only)
    print(json.dumps(result, indent=1))
    failed = {n for k, r in result.items() if k != "models" for n in r["failed_sources"]}
    if failed:
        print(f"finished, but these sources failed: {', '.join(sorted(failed))}", file=sys.stderr)
        return 1
    return 0


def cmd_make_base(args: argparse.Namespace) -> int:
    from codeadapt.config import load_settings

    overrides = [*args.overrides, f"base.model={json.dumps(args.model)}"]
    load_settings(args.config, profile=args.profile, overrides=overrides)
    _prefect_env(args.config)
    from flows.phase import base

    print(base(config=args.config, profile=args.profile, overrides=overrides))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from codeadapt.config import load_settings

    s = load_settings(args.config, profile=args.profile, overrides=args.overrides)
    for phase in s.phases:
        print(f"{phase}: {', '.join(s.phase_sources(phase))}")
    return 0


def _stack_home(args: argparse.Namespace):
    from codeadapt import stack

    home = stack.paths(args.home).home
    # Prefect, if this process imports it, reads the stack's home, never ~/.prefect.
    for k, v in {**OFFLINE_ENV, "PREFECT_HOME": str(home)}.items():
        os.environ.setdefault(k, v)
    return home


def cmd_up(args: argparse.Namespace) -> int:
    from codeadapt import stack

    home = _stack_home(args)
    try:
        res = stack.up(port=args.port, home=home, pool=args.pool, cron=args.cron,
                       timezone=args.timezone, timeout=args.timeout, say=print)
    except stack.StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for note in res.notes:
        print(note)
    st = res.state
    if not res.already_running:
        print(f"up: server {st['url']} (PID {st['server']['pid']}), worker PID "
              f"{st['worker']['pid']} on pool {st['pool']!r}; logs in {stack.paths(home).logs}")
    print(f"UI: {st['url']}   stop with: codeadapt down")
    print("Point Prefect commands at it with:")
    print(f"  {stack.env_line(st['api_url'], home)}")
    print(f"The UI and the API ask for the password in {stack.paths(home).auth_file} (user:password).")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from codeadapt import stack

    home = _stack_home(args)
    if not stack.read_state(home):
        print(f"nothing to stop (no stack state in {home})")
        return 0
    stopped = stack.down(home, timeout=args.timeout)
    print(f"stopped {len(stopped)} process(es)" + (f": {', '.join(map(str, stopped))}" if stopped else ""))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from codeadapt import stack

    st = stack.status(_stack_home(args))
    print(stack.format_status(st))
    return 0 if st["running"] and st["healthy"] and st["worker_alive"] else 3


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="codeadapt", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a phase flow (its whole chain) end to end")
    run.add_argument("phase", help="phase5, phase6 or phase7")
    _common(run)
    run.add_argument("--data-only", action="store_true", help="build the datasets (the phase's and the held-out repositories'), "
                     "skip base, training and eval")
    run.add_argument("--runner", choices=["threads", "dask"], help="task runner (default: [runner] in the config)")
    run.add_argument("--dask-address", metavar="ADDRESS",
                     help="run per-source tasks on an existing Dask cluster, e.g. tcp://host:8786")
    run.set_defaults(fn=cmd_run)
    mb = sub.add_parser("make-base", help="build the base model: 'smollm2-135m' converts the wheel's GGUF; "
                        "'tiny' builds and pre-trains one offline")
    mb.add_argument("model", nargs="?", default="smollm2-135m",
                    help="'smollm2-135m' (default), 'tiny', or an mlx-lm model id / path")
    _common(mb)
    mb.set_defaults(fn=cmd_make_base)
    cfg = sub.add_parser("config", help="validate the config and list each phase's sources")
    _common(cfg)
    cfg.set_defaults(fn=cmd_config)
    home_help = "the stack's PREFECT_HOME (default: .prefect/ in the repository)"
    upp = sub.add_parser("up", help="start a local Prefect server, work pool, deployments and worker")
    upp.add_argument("--port", type=int, default=4200, help="server port on 127.0.0.1 (default: %(default)s)")
    upp.add_argument("--pool", default="codeadapt", help="process work pool (default: %(default)s)")
    upp.add_argument("--timezone", default=os.environ.get("CODEADAPT_NIGHTLY_TZ"),
                     help="nightly schedule's timezone, e.g. Europe/Berlin (default: $CODEADAPT_NIGHTLY_TZ or UTC)")
    upp.add_argument("--cron", default=os.environ.get("CODEADAPT_NIGHTLY_CRON"),
                     help="nightly schedule (default: $CODEADAPT_NIGHTLY_CRON or '0 3 * * *', 03:00)")
    upp.add_argument("--home", default=None, help=home_help)
    upp.add_argument("--timeout", type=float, default=180, help="seconds to wait for the server (default: %(default)s)")
    upp.set_defaults(fn=cmd_up)
    dn = sub.add_parser("down", help="stop the server and worker that `up` started")
    dn.add_argument("--home", default=None, help=home_help)
    dn.add_argument("--timeout", type=float, default=20, help="seconds before SIGKILL (default: %(default)s)")
    dn.set_defaults(fn=cmd_down)
    stp = sub.add_parser("status", help="what runs: server URL and health, worker, deployments")
    stp.add_argument("--home", default=None, help=home_help)
    stp.set_defaults(fn=cmd_status)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
