"""Nightly: re-sync every source and recompute only what changed.

Per-source tasks hit Prefect's cache when their commit is unchanged, a dataset is rebuilt only
when its inputs hash changes, and training runs only for phases whose dataset (or base, or
spec) changed. The run ends with a "what changed since the last run" artifact.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from codeadapt import changes
from codeadapt.config import DEFAULT_CONFIG, load_settings
from flows.phase import run_phase

TABLE_FILE = "phase-table.json"  # last run's table, for eval deltas


@flow(name="nightly", log_prints=True)
def nightly(config: str = DEFAULT_CONFIG, profile: str | None = None, overrides: list[str] | None = None,
            phase: str = "phase7", models: bool = True) -> dict[str, Any]:
    settings = load_settings(config, profile=profile, overrides=overrides)
    data = settings.resolve(settings.paths.data)
    adapters = settings.resolve(settings.paths.adapters)
    chain = settings.phase_chain(phase)
    before = changes.snapshot(data, chain)
    table_path = adapters / TABLE_FILE
    old_table = {r["phase"]: r["accuracy"] for r in json.loads(table_path.read_text())} if table_path.is_file() else {}

    result = run_phase(phase, config, profile, overrides, models)

    d = changes.diff(before, changes.snapshot(data, chain))
    trained, decisions, deltas = {}, {}, {}
    if models:
        m = result["models"]
        trained = m["trained"]
        decisions = {p: (v["promoted"], v["why"]) for p, v in m["promotion"].items()}
        deltas = {r["phase"]: (old_table.get(r["phase"]), r["accuracy"]) for r in m["table"]}
        tmp = table_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(m["table"], indent=1))
        tmp.replace(table_path)
    create_markdown_artifact(key="nightly-changes", markdown=changes.markdown(d, trained, decisions, deltas),
                             description="What changed since the last run")
    result["changes"] = d
    return result
