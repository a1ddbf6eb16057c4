"""Task runners for the phase flows, chosen from `[runner]` in the config or CLI flags."""

from __future__ import annotations

import os
from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from codeadapt.config import RunnerSpec


def task_runner(spec: RunnerSpec) -> Any:
    """Threads for one box; Dask for processes or many machines. Tree-sitter holds the GIL
    while parsing, so a local Dask cluster of processes also speeds up extraction. Workers
    of a remote cluster need the repos dir and Prefect's result storage on a shared path."""
    if spec.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if spec.address:
            return DaskTaskRunner(address=spec.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": spec.n_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=spec.max_workers)


def share_temporary_server() -> str | None:
    """Dask workers are other processes. Without `PREFECT_API_URL` each would start a temporary
    Prefect server of its own, and the task runs would be recorded there, not in this run:
    start this process's temporary server now and pass its URL to the workers, which inherit
    the environment. Nothing to do when a server is configured. Returns the URL set."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    return server.api_url
