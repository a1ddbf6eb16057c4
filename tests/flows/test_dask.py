"""Scale-out: the same data build on a 2-worker Dask LocalCluster equals the thread-pool one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from codeadapt.config import RunnerSpec

pytestmark = pytest.mark.slow


def overrides(data: Path) -> list[str]:
    return [f"paths.data='{data}'", f"paths.repos='{data / 'repos'}'",
            "groups.domain.budget={grep = 6, read = 3, explain = 3}",
            "groups.popular.budget={grep = 40, read = 20, explain = 20}"]


def test_dask_build_has_the_same_manifest_hashes(prefect_server, tmp_path: Path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    from flows.phase import phase7
    from flows.runners import task_runner

    # Both builds must compute, not reuse each other's cached per-source results.
    monkeypatch.setenv("PREFECT_TASKS_REFRESH_CACHE", "true")
    # Workers are spawned processes: they report to this server only if the environment names
    # it (what `codeadapt run --runner dask` does with its temporary server).
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    cfg = str(REPO_ROOT / "pipeline.toml")
    with temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}):
        threads = phase7.with_options(task_runner=task_runner(RunnerSpec()))(
            config=cfg, overrides=overrides(tmp_path / "threads"), models=False)
        state = phase7.with_options(task_runner=task_runner(RunnerSpec(kind="dask", n_workers=2)))(
            config=cfg, overrides=overrides(tmp_path / "dask"), models=False, return_state=True)
        dask = state.result()
    for phase in ("phase5", "phase6", "phase7"):
        assert threads[phase]["inputs_hash"] == dask[phase]["inputs_hash"]
        a, b = (json.loads((tmp_path / d / phase / "manifest.json").read_text()) for d in ("threads", "dask"))
        assert a["outputs"] == b["outputs"] and a["counts"]["total"] > 0
    # The workers' task runs are recorded in this run, on this server (not on temporary
    # servers of their own): one make_examples per Python source.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])), limit=200)
    made = [r.name for r in runs if r.name.startswith("make_examples[")]
    from codeadapt.config import load_settings

    settings = load_settings(cfg, overrides=overrides(tmp_path / "dask"))
    python = {n for n, s in settings.phase_sources("phase7").items() if s.generator == "python"}
    assert sorted(made) == sorted(f"make_examples[{n}]" for n in python) and len(python) == 11
