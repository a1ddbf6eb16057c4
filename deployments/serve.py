"""One-box alternative to the work pool: serve all four deployments from this process.

    export PREFECT_API_URL=http://127.0.0.1:4200/api   # a running server (e.g. `codeadapt up`)
    uv run python deployments/serve.py [--timezone Europe/Berlin] [--cron "0 3 * * *"]
    prefect deployment run 'phase7/phase7' --param models=false

Deployment names are the flow names ('phase5/phase5', 'phase6/phase6', 'phase7/phase7',
'nightly/nightly'), the same as deployments/prefect.yaml's: whichever registered last owns a
name, so use one way at a time (this script deletes the work-pool ones it replaces; deploying
prefect.yaml again switches back). `pause_on_shutdown=False`: stopping this process does not pause
the deployments, so the nightly schedule stays active across a restart. Flow runs start in the
repository root, as with `codeadapt run`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CRON = "0 3 * * *"  # 03:00
DEFAULT_TZ = "UTC"
PARAMETERS = {"profile": "offline", "overrides": []}


def build_deployments(cron: str = DEFAULT_CRON, timezone: str = DEFAULT_TZ) -> list:
    from prefect.schedules import Cron

    from flows.nightly import nightly
    from flows.phase import phase5, phase6, phase7

    deps = [f.to_deployment(name=f.name, parameters=PARAMETERS,
                            description=f"{f.name} (served by deployments/serve.py)")
            for f in (phase5, phase6, phase7)]
    deps.append(nightly.to_deployment(name="nightly", parameters=PARAMETERS,
                                      schedules=[Cron(cron, timezone=timezone)],
                                      description="nightly: scheduled rebuild (served)"))
    return deps


def take_over(names: list[str]) -> list[str]:
    """Delete same-named deployments that belong to a work pool (deployments/prefect.yaml's):
    re-registering over them keeps their pool and loses the code location, so their runs would
    crash. Returns the names deleted; their past flow runs stay."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    deleted = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                dep = client.read_deployment_by_name(f"{name}/{name}")
            except ObjectNotFound:
                continue
            if dep.work_pool_name:
                client.delete_deployment(dep.id)
                deleted.append(f"{name}/{name}")
    return deleted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cron", default=os.environ.get("CODEADAPT_NIGHTLY_CRON", DEFAULT_CRON),
                    help="nightly schedule (default: $CODEADAPT_NIGHTLY_CRON or %(default)r)")
    ap.add_argument("--timezone", default=os.environ.get("CODEADAPT_NIGHTLY_TZ", DEFAULT_TZ),
                    help="its timezone (default: $CODEADAPT_NIGHTLY_TZ or %(default)s)")
    ap.add_argument("--limit", type=int, default=None, help="most flow runs at once (default: no limit)")
    args = ap.parse_args(argv)

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(ROOT / "data" / "cache" / "results"))
    os.chdir(ROOT)  # flow runs resolve pipeline.toml and data/ against the repository
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if not os.environ.get("PREFECT_API_URL"):
        from codeadapt import stack

        st = stack.status()
        if st["running"] and st["healthy"]:
            os.environ["PREFECT_API_URL"] = st["api_url"]
            os.environ.setdefault("PREFECT_HOME", st["home"])
            print(f"using the `codeadapt up` server: {stack.env_line(st['api_url'])}", file=sys.stderr)
        else:
            print("note: PREFECT_API_URL is not set and `codeadapt up` is not running: serving "
                  "against a temporary server that goes away with this process", file=sys.stderr)

    from prefect import serve

    from tasks.ml import ensure_gpu_limit

    ensure_gpu_limit()
    deps = build_deployments(args.cron, args.timezone)
    replaced = take_over([d.name for d in deps])
    if replaced:
        print(f"replacing the work-pool deployments {', '.join(replaced)} with served ones "
              "(`prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml` "
              "switches back)", file=sys.stderr)
    serve(*deps, pause_on_shutdown=False, limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
